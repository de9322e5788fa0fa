//! The system time zone for `expiry-time` values written without `Z`, as OpenSSH reads them
//! (TZ, /etc/localtime; through jiff).

use super::policy::LocalOffset;

/// The system time zone (TZ, /etc/localtime), as OpenSSH uses for `expiry-time` without `Z`.
pub struct SystemTz;

impl LocalOffset for SystemTz {
    fn offset_secs(&self, naive: i64) -> i64 {
        let days = naive.div_euclid(86_400);
        let secs = naive.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        let (Ok(y), Ok(m), Ok(d)) = (i16::try_from(y), i8::try_from(m), i8::try_from(d)) else {
            return 0;
        };
        let Ok(civil) = jiff::civil::DateTime::new(
            y,
            m,
            d,
            (secs / 3600) as i8,
            (secs / 60 % 60) as i8,
            (secs % 60) as i8,
            0,
        ) else {
            return 0;
        };
        // A time skipped or repeated by a DST change resolves as mktime does by default.
        match civil.to_zoned(jiff::tz::TimeZone::system()) {
            Ok(z) => i64::from(z.offset().seconds()),
            Err(_) => 0,
        }
    }
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_780), (2026, 11, 23));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}
