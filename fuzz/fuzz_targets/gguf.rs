#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| refusal_lens_engine::fuzzing::gguf(data));
