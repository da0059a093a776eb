#![no_main]
libfuzzer_sys::fuzz_target!(|input: keel_fuzz::mgmt::Input| keel_fuzz::mgmt::run(input));
