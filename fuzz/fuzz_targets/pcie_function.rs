#![no_main]
libfuzzer_sys::fuzz_target!(|input: keel_fuzz::pcie::Input| keel_fuzz::pcie::run(input));
