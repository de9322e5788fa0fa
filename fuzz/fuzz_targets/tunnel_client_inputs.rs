#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::targets::tunnel_client_inputs(data));
