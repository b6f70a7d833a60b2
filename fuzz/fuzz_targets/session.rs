#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| refusal_lens::session_file::fuzz_read(data));
