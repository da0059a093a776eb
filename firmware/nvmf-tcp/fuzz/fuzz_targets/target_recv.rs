#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| keel_nvmf_tcp_fuzz::target_recv(data));
