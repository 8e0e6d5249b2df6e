//! Fuzz target: arbitrary bytes must never make the GGUF parser (or the model/tokenizer
//! loaders built on it) panic, hang or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = inference::Gguf::parse(data) {
        for t in &g.tensors {
            assert_eq!(g.tensor_data(t).len() as u64, t.size);
        }
        let _ = inference::LlamaConfig::from_gguf(&g);
        let _ = inference::LlamaWeights::from_gguf(&g);
        let _ = inference::tokenizer::Tokenizer::from_gguf(&g);
    }
});
