#![no_main]
libfuzzer_sys::fuzz_target!(
    |input: keel_fuzz::controller::Input| keel_fuzz::controller::run(input)
);
