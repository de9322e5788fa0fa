//! The admin page on the control API's TCP listener (`/ui`): live sessions with their channels
//! and tunnels, grants and locks, with buttons to end a session, revoke a grant and add or
//! lift a lock. Server-rendered HTML; one small script refreshes the live part.
//!
//! Login takes a bearer token from `[control] tokens`; it is kept (base64) in an HttpOnly,
//! Secure, SameSite=Strict cookie and checked against the tokens file on every request, so a
//! token removed from the file logs its pages out. Every POST carries a CSRF token: an HMAC of
//! the login token under a key made at start (stateless; a restart logs nobody out but
//! invalidates open forms, which then ask to reload).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::OnceLock;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tracing::info;

use super::tokens::Tokens;
use super::Api;

/// The cookie that holds the login.
const COOKIE: &str = "sluice_admin";
/// How long a login lasts.
const LOGIN_FOR: u64 = 8 * 3600;
/// Sessions per page.
const PER_PAGE: usize = 50;
/// A form body larger than this is refused.
const MAX_FORM: usize = 8 * 1024;

/// The script that refreshes the live part every 3 s without touching the forms.
const SCRIPT: &str = r#"// Refreshes #live in place every 3 s (forms outside it keep what was typed).
setInterval(async () => {
  const r = await fetch(location.href, { credentials: "same-origin" });
  if (r.status !== 200) return;
  const fresh = new DOMParser().parseFromString(await r.text(), "text/html").getElementById("live");
  if (fresh) document.getElementById("live").replaceWith(fresh);
}, 3000);
"#;

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em;width:100%}\
th,td{border-bottom:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}\
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}\
code{font-size:12px}.msg{background:#eef6ee;padding:.5em;border:1px solid #9c9}\
.err{background:#fbeaea;border-color:#c99}small{color:#666}form.i{display:inline}\
button{cursor:pointer}";

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn csrf_key() -> &'static aws_lc_rs::hmac::Key {
    static KEY: OnceLock<aws_lc_rs::hmac::Key> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut k = [0u8; 32];
        let _ = aws_lc_rs::rand::fill(&mut k);
        aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &k)
    })
}

/// The CSRF token of a login.
fn csrf(token: &str) -> String {
    let tag = aws_lc_rs::hmac::sign(csrf_key(), token.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&tag.as_ref()[..24])
}

fn csrf_ok(token: &str, presented: Option<&str>) -> bool {
    let Some(p) = presented else { return false };
    aws_lc_rs::constant_time::verify_slices_are_equal(csrf(token).as_bytes(), p.as_bytes()).is_ok()
}

/// The login token from the request's cookie, if there is one.
fn cookie_token(req: &http::request::Parts) -> Option<String> {
    let raw = req.headers.get_all(header::COOKIE);
    for v in raw.iter().filter_map(|v| v.to_str().ok()) {
        for kv in v.split(';') {
            if let Some(val) = kv
                .trim()
                .strip_prefix(COOKIE)
                .and_then(|r| r.strip_prefix('='))
            {
                let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(val)
                    .ok()?;
                return String::from_utf8(bytes).ok();
            }
        }
    }
    None
}

fn page(status: StatusCode, title: &str, body: &str) -> Response<Full<Bytes>> {
    let html = format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>{} - sluice</title>\
         <meta name=viewport content=\"width=device-width\"><style>{STYLE}</style>\
         <script src=\"/ui/app.js\" defer></script></head><body>{body}</body></html>",
        esc(title)
    );
    let mut r = Response::new(Full::new(Bytes::from(html)));
    *r.status_mut() = status;
    secure(&mut r, "text/html; charset=utf-8");
    r
}

fn secure(r: &mut Response<Full<Bytes>>, kind: &'static str) {
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; \
             img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

fn redirect(to: &str, cookie: Option<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `/ui?msg=...` with the message encoded.
fn back(msg: &str) -> Response<Full<Bytes>> {
    let q: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("msg", msg)
        .finish();
    redirect(&format!("/ui?{q}"), None)
}

fn login_page(status: StatusCode, error: Option<&str>) -> Response<Full<Bytes>> {
    let err = error.map_or(String::new(), |e| {
        format!("<p class=\"msg err\">{}</p>", esc(e))
    });
    page(
        status,
        "Log in",
        &format!(
            "<h1>sluice</h1>{err}<form method=post action=/ui/login>\
             <label>Control API token <input type=password name=token autocomplete=off autofocus required size=50></label> \
             <button type=submit>Log in</button></form>\
             <p><small>A token from <code>[control] tokens</code>. It is kept in a cookie only this page can use.</small></p>"
        ),
    )
}

/// Reads a urlencoded form (at most [`MAX_FORM`] bytes).
async fn form(body: Incoming) -> Option<Vec<(String, String)>> {
    let bytes = Limited::new(body, MAX_FORM)
        .collect()
        .await
        .ok()?
        .to_bytes();
    Some(form_urlencoded::parse(&bytes).into_owned().collect())
}

fn field<'a>(f: &'a [(String, String)], k: &str) -> Option<&'a str> {
    f.iter()
        .find(|(n, _)| n == k)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// Serves `/ui...` for a caller on TCP from `peer`.
pub(super) async fn handle(
    req: Request<Incoming>,
    api: &Api,
    tokens: &Tokens,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    if (&parts.method, path.as_str()) == (&Method::GET, "/ui/app.js") {
        let mut r = Response::new(Full::new(Bytes::from_static(SCRIPT.as_bytes())));
        secure(&mut r, "text/javascript; charset=utf-8");
        return r;
    }
    if (&parts.method, path.as_str()) == (&Method::POST, "/ui/login") {
        let Some(f) = form(body).await else {
            return login_page(StatusCode::BAD_REQUEST, Some("the form could not be read"));
        };
        let token = field(&f, "token").unwrap_or_default();
        return match tokens.check(token) {
            Some(name) => {
                info!(target: "sluice::control", %peer, token = name, "admin page: logged in");
                let v = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token);
                let cookie = format!(
                    "{COOKIE}={v}; Path=/ui; HttpOnly; Secure; SameSite=Strict; Max-Age={LOGIN_FOR}"
                );
                redirect("/ui", Some(cookie))
            }
            None => {
                crate::metrics::count(&crate::metrics::get().control_refused, "unauthorized");
                tracing::warn!(target: "sluice::control", %peer, "admin page: a login with a token that is not valid");
                login_page(StatusCode::UNAUTHORIZED, Some("That is not a valid token."))
            }
        };
    }
    let login = cookie_token(&parts).and_then(|t| tokens.check(&t).map(|name| (t, name)));
    let Some((token, name)) = login else {
        return match parts.method {
            Method::GET => login_page(StatusCode::OK, None),
            _ => login_page(StatusCode::UNAUTHORIZED, Some("Log in first.")),
        };
    };
    let who = format!("token {name} from {peer} (admin page)");
    match (&parts.method, path.as_str()) {
        (&Method::GET, "/ui" | "/ui/") => {
            render(api, parts.uri.query().unwrap_or(""), &token, &name)
        }
        (&Method::POST, _) => {
            let Some(f) = form(body).await else {
                return back("the form could not be read");
            };
            if !csrf_ok(&token, field(&f, "csrf")) {
                return back("the form was stale (reload the page and try again)");
            }
            act(api, &path, &f, &who).await
        }
        _ => page(
            StatusCode::NOT_FOUND,
            "Not found",
            "<p>No such page. <a href=/ui>Back</a></p>",
        ),
    }
}

/// Runs a button's action; back to the page with what happened.
async fn act(api: &Api, path: &str, f: &[(String, String)], who: &str) -> Response<Full<Bytes>> {
    match path {
        "/ui/logout" => redirect(
            "/ui",
            Some(format!(
                "{COOKIE}=; Path=/ui; HttpOnly; Secure; SameSite=Strict; Max-Age=0"
            )),
        ),
        "/ui/kill" => match field(f, "session").and_then(|s| s.parse::<u64>().ok()) {
            Some(id) => match crate::sessions::table().kill(id, who) {
                Ok(_) => back(&format!("Ended session {id}.")),
                Err(e) => back(&e.to_string()),
            },
            None => back("no session given"),
        },
        "/ui/revoke" => {
            let (Some(g), Some(id)) = (api.grants.clone(), field(f, "grant").map(str::to_string))
            else {
                return back("no grant given (or grants are off)");
            };
            match tokio::task::spawn_blocking(move || g.revoke(&id).map(|(v, n)| (v.id, n))).await {
                Ok(Ok((id, n))) => back(&format!("Revoked {id}; live sessions ended: {n}.")),
                Ok(Err(e)) => back(&e.to_string()),
                Err(e) => back(&e.to_string()),
            }
        }
        "/ui/lock" => {
            let Some(locks) = api.locks.clone() else {
                return back("locks are off");
            };
            let kind = field(f, "kind").unwrap_or_default();
            let value = field(f, "value").map(|v| v.trim().to_string());
            let mut req = crate::lock::LockRequest {
                reason: field(f, "reason").map(str::to_string),
                ..Default::default()
            };
            match kind {
                "key" => req.key = value,
                "grant" => req.grant = value,
                "device" => req.device = value,
                "source" => req.source = value,
                _ => return back("kind: key, grant, device or source"),
            }
            if let Some(t) = field(f, "ttl") {
                match humantime::parse_duration(t) {
                    Ok(d) => req.ttl = Some(d),
                    Err(e) => return back(&format!("ttl: {e}")),
                }
            }
            let who = who.to_string();
            match tokio::task::spawn_blocking(move || locks.add(&req, &who)).await {
                Ok(Ok((l, n))) => back(&format!(
                    "Locked {} {} ({}); live sessions ended: {n}.",
                    l.kind, l.value, l.id
                )),
                Ok(Err(e)) => back(&e.to_string()),
                Err(e) => back(&e.to_string()),
            }
        }
        "/ui/lift" => {
            let (Some(locks), Some(id)) = (api.locks.clone(), field(f, "lock").map(str::to_string))
            else {
                return back("no lock given");
            };
            let who = who.to_string();
            match tokio::task::spawn_blocking(move || locks.lift(&id, &who)).await {
                Ok(Ok(l)) => back(&format!("Lifted {}.", l.id)),
                Ok(Err(e)) => back(&e.to_string()),
                Err(e) => back(&e.to_string()),
            }
        }
        _ => back("no such action"),
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 10 << 30 => format!("{} GiB", n >> 30),
        n if n >= 10 << 20 => format!("{} MiB", n >> 20),
        n if n >= 10 << 10 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

/// A hidden CSRF field and a one-button form posting `name=value` to `action`.
fn button(action: &str, name: &str, value: &str, label: &str, csrf: &str) -> String {
    format!(
        "<form class=i method=post action=\"{action}\"><input type=hidden name=csrf value=\"{csrf}\">\
         <input type=hidden name=\"{name}\" value=\"{}\"><button type=submit>{label}</button></form>",
        esc(value)
    )
}

fn render(api: &Api, query: &str, token: &str, name: &str) -> Response<Full<Bytes>> {
    let q: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let filter = get("q").unwrap_or_default().trim().to_lowercase();
    let page_no: usize = get("page").and_then(|p| p.parse().ok()).unwrap_or(1).max(1);
    let csrf = csrf(token);
    let snap = api.sessions();
    let all = snap.sessions.len();
    let shown: Vec<&crate::sessions::SessionView> = snap
        .sessions
        .iter()
        .filter(|s| {
            filter.is_empty() || {
                let i = &s.identity;
                [
                    s.id.to_string().as_str(),
                    &i.user,
                    &i.key,
                    &s.source,
                    i.grant.as_deref().unwrap_or(""),
                    i.device.as_deref().unwrap_or(""),
                ]
                .iter()
                .any(|f| f.to_lowercase().contains(&filter))
                    || s.tunnels.iter().any(|t| t.name.contains(&filter))
            }
        })
        .collect();
    let pages = shown.len().div_ceil(PER_PAGE).max(1);
    let page_no = page_no.min(pages);
    let mut h = String::new();
    let _ = write!(
        h,
        "<h1>sluice</h1><p><small>Logged in with token <b>{}</b>.</small> \
         <form class=i method=post action=/ui/logout><input type=hidden name=csrf value=\"{csrf}\">\
         <button type=submit>Log out</button></form></p>",
        esc(name)
    );
    if let Some(m) = get("msg") {
        let _ = write!(h, "<p class=msg id=msg>{}</p>", esc(m));
    }
    let _ = write!(
        h,
        "<form method=get action=/ui><input name=q value=\"{}\" placeholder=\"user, key, source, device, grant, tunnel\" size=40> \
         <button type=submit>Filter</button></form>",
        esc(&filter)
    );
    h.push_str("<div id=live>");
    let conns: Vec<String> = snap
        .connections
        .iter()
        .map(|(r, n)| format!("{} {n}", esc(r)))
        .collect();
    let _ = write!(
        h,
        "<h2>Sessions <small>{} of {all} live{}; page {page_no} of {pages}</small></h2>\
         <p><small>Open connections by route: {}</small></p>",
        shown.len(),
        if filter.is_empty() { "" } else { " (filtered)" },
        if conns.is_empty() {
            "none".into()
        } else {
            conns.join(", ")
        },
    );
    h.push_str("<table id=sessions><tr><th>ID</th><th>Who</th><th>Source</th><th>Since</th><th>Up</th><th>Down</th><th>Channels, listeners, tunnels</th><th></th></tr>");
    for s in shown.iter().skip((page_no - 1) * PER_PAGE).take(PER_PAGE) {
        let i = &s.identity;
        let mut who = format!("{}<br><code>{}</code>", esc(&i.user), esc(&i.key));
        if let Some(c) = &i.certificate {
            let _ = write!(
                who,
                "<br><small>certificate {} serial {}</small>",
                esc(&c.key_id),
                c.serial
            );
        }
        if let (Some(g), Some(d)) = (&i.grant, &i.device) {
            let _ = write!(who, "<br><small>grant {} device {}</small>", esc(g), esc(d));
        }
        let mut what = String::new();
        for l in &s.listeners {
            let _ = write!(what, "listens {}<br>", esc(l));
        }
        for t in &s.tunnels {
            let _ = write!(
                what,
                "tunnel <b>{}:{}</b> visits {} ({} in, {} out)<br>",
                esc(&t.name),
                t.port,
                t.visits,
                bytes(t.bytes_to_publisher),
                bytes(t.bytes_to_visitors)
            );
        }
        for c in &s.channels {
            let _ = write!(
                what,
                "{:?} {} <small>since {} up {} down {}</small><br>",
                c.kind,
                esc(&c.target),
                esc(&c.since),
                bytes(c.bytes_up),
                bytes(c.bytes_down)
            );
        }
        let _ = write!(
            h,
            "<tr data-session=\"{id}\"><td>{id}</td><td>{who}</td><td>{}</td><td>{}</td><td class=n>{}</td><td class=n>{}</td><td>{what}</td><td>{}</td></tr>",
            esc(&s.source),
            esc(&s.since),
            bytes(s.bytes_up),
            bytes(s.bytes_down),
            button("/ui/kill", "session", &s.id.to_string(), "End session", &csrf),
            id = s.id,
        );
    }
    h.push_str("</table>");
    if pages > 1 {
        let link = |p: usize, label: &str| {
            let qs = form_urlencoded::Serializer::new(String::new())
                .append_pair("q", &filter)
                .append_pair("page", &p.to_string())
                .finish();
            format!("<a href=\"/ui?{qs}\">{label}</a> ")
        };
        if page_no > 1 {
            h.push_str(&link(page_no - 1, "&larr; previous"));
        }
        if page_no < pages {
            h.push_str(&link(page_no + 1, "next &rarr;"));
        }
    }
    if let Some(g) = &api.grants {
        h.push_str("<h2>Grants</h2><table id=grants><tr><th>Grant</th><th>Device</th><th>Port</th><th>Name</th><th>Expires</th><th>First used</th><th></th></tr>");
        for v in g.list(false).unwrap_or_default() {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&v.id),
                esc(&v.device),
                v.port,
                esc(v.name.as_deref().unwrap_or("-")),
                esc(&v.expires),
                esc(v.first_used.as_deref().unwrap_or("-")),
                button("/ui/revoke", "grant", &v.id, "Revoke", &csrf)
            );
        }
        h.push_str("</table>");
    }
    if let Some(l) = &api.locks {
        h.push_str("<h2>Locks</h2><table id=locks><tr><th>Lock</th><th>Kind</th><th>Value</th><th>Reason</th><th>Expires</th><th>By</th><th></th></tr>");
        for v in l.list() {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&v.id),
                esc(&v.kind),
                esc(&v.value),
                esc(&v.reason),
                esc(v.expires.as_deref().unwrap_or("until lifted")),
                esc(&v.by),
                button("/ui/lift", "lock", &v.id, "Lift", &csrf)
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</div>");
    if api.locks.is_some() {
        let _ = write!(
            h,
            "<h2>Add a lock</h2><form method=post action=/ui/lock id=add-lock><input type=hidden name=csrf value=\"{csrf}\">\
             <select name=kind><option value=key>key (SHA256:...)</option><option value=grant>grant</option>\
             <option value=device>device</option><option value=source>source (CIDR)</option></select> \
             <input name=value required size=50 placeholder=\"SHA256:..., g-..., device id or 192.0.2.0/24\"> \
             <input name=ttl size=6 placeholder=\"ttl: 1h\"> <input name=reason size=30 placeholder=reason> \
             <button type=submit>Lock</button></form>\
             <p><small>A lock ends the matching sessions now and refuses new ones until it is lifted or expires.</small></p>"
        );
    }
    page(StatusCode::OK, "Sessions", &h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped_and_csrf_tokens_belong_to_their_login() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        let t = csrf("token-a");
        assert!(csrf_ok("token-a", Some(&t)));
        assert!(!csrf_ok("token-b", Some(&t)));
        assert!(!csrf_ok("token-a", None));
        assert!(!csrf_ok("token-a", Some("")));
    }
}
