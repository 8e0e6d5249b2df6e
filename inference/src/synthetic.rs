//! Deterministic synthetic models: a complete, valid GGUF file (Llama architecture, tiny GPT-2
//! style byte-level tokenizer, ChatML chat template) with pseudo-random weights of a chosen type.
//!
//! Used by fast tests (CPU reference vs. CUDA, the HTTP API) and by bandwidth benchmarks on
//! large configs without downloading a real model. The output is a pure function of
//! `(config, weight_type, seed)`.

use crate::error::InferenceError;
use crate::gguf::{GgmlType, GgufWriter, Value};
use crate::model::{LlamaConfig, RopeScaling, RopeStyle};
use crate::quant::quantize;
use crate::tokenizer::byte_to_unicode;

/// Special tokens of the synthetic vocabulary (ids 0, 1, 2 as in SmolLM2).
pub const SYNTHETIC_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Merges of the synthetic vocabulary (each adds one token after the 256 byte tokens).
const MERGES: [(&str, &str); 12] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
    ("o", "n"),
    ("Ġ", "s"),
    ("r", "e"),
    ("a", "t"),
    ("Ġ", "i"),
    ("Ġi", "s"),
];

/// The ChatML template (as SmolLM2 ships it, minus the default system prompt).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Qwen2.5-Instruct's chat template (as its GGUF `tokenizer.chat_template` carries it).
pub const QWEN25_TEMPLATE: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

/// Llama-3.1-Instruct's chat template (as its GGUF `tokenizer.chat_template` carries it; the
/// built-in tools branch shortened).
pub const LLAMA31_TEMPLATE: &str = r#"{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

/// Which chat template (and special tokens) a synthetic model carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFamily {
    /// ChatML like SmolLM2 (no tool format): the default.
    ChatMl,
    /// Qwen2.5-Instruct: ChatML plus `<tool_call>`/`</tool_call>`, its template.
    Qwen25,
    /// Llama-3.1-Instruct: its header tokens and template.
    Llama31,
}

impl ChatFamily {
    /// (token, GGUF token type) of the special tokens, in id order from 0.
    fn specials(self) -> &'static [(&'static str, i32)] {
        match self {
            ChatFamily::ChatMl => &[("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3)],
            ChatFamily::Qwen25 => &[
                ("<|endoftext|>", 3),
                ("<|im_start|>", 3),
                ("<|im_end|>", 3),
                ("<tool_call>", 4),
                ("</tool_call>", 4),
            ],
            ChatFamily::Llama31 => &[
                ("<|begin_of_text|>", 3),
                ("<|end_of_text|>", 3),
                ("<|start_header_id|>", 3),
                ("<|end_header_id|>", 3),
                ("<|eot_id|>", 3),
                ("<|eom_id|>", 3),
                ("<|python_tag|>", 3),
            ],
        }
    }

    fn template(self) -> &'static str {
        match self {
            ChatFamily::ChatMl => CHATML_TEMPLATE,
            ChatFamily::Qwen25 => QWEN25_TEMPLATE,
            ChatFamily::Llama31 => LLAMA31_TEMPLATE,
        }
    }

    /// (bos, eos) ids.
    fn bos_eos(self) -> (u32, u32) {
        match self {
            ChatFamily::ChatMl | ChatFamily::Qwen25 => (1, 2),
            ChatFamily::Llama31 => (0, 4),
        }
    }
}

/// SplitMix64: tiny, fast, deterministic.
struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

/// Minimum vocabulary size a synthetic model needs (specials + bytes + merges).
pub fn min_synthetic_vocab() -> usize {
    SYNTHETIC_SPECIALS.len() + 256 + MERGES.len()
}

/// The synthetic vocabulary: tokens and their types (1 normal, 3 control, 4 user-defined,
/// 5 unused).
fn vocab(n: usize, family: ChatFamily) -> (Vec<String>, Vec<i32>) {
    let b2u = byte_to_unicode();
    let mut tokens: Vec<String> = family.specials().iter().map(|s| s.0.to_string()).collect();
    let mut types: Vec<i32> = family.specials().iter().map(|s| s.1).collect();
    for c in b2u {
        tokens.push(c.to_string());
        types.push(1);
    }
    for (a, b) in MERGES {
        tokens.push(format!("{a}{b}"));
        types.push(1);
    }
    let mut i = 0;
    while tokens.len() < n {
        tokens.push(format!("<|unused_{i}|>"));
        types.push(5);
        i += 1;
    }
    (tokens, types)
}

/// Builds a complete synthetic GGUF for `cfg` with weight matrices (and embeddings) in `weight_type`;
/// norms are F32. `cfg.arch` must be `llama` or `qwen2` (qwen2 gets q/k/v biases).
pub fn synthetic_gguf(
    cfg: &LlamaConfig,
    weight_type: GgmlType,
    seed: u64,
) -> Result<Vec<u8>, InferenceError> {
    build(cfg, weight_type, seed, false, ChatFamily::ChatMl)
}

/// Like [`synthetic_gguf`] with another model family's special tokens and chat template (for
/// tests of the tool-call formats).
pub fn synthetic_gguf_family(
    cfg: &LlamaConfig,
    weight_type: GgmlType,
    seed: u64,
    family: ChatFamily,
) -> Result<Vec<u8>, InferenceError> {
    build(cfg, weight_type, seed, false, family)
}

/// Like [`synthetic_gguf`], but block-quantized matrices (Q8_0, Q4_0, Q4_1) are filled with
/// random quant bytes and a fixed per-matrix scale directly instead of quantizing random
/// floats: about 20x faster, for benchmark models of billions of parameters (the values are
/// as random and of the same magnitude; only the bytes read per token matter there).
pub fn synthetic_gguf_fast(
    cfg: &LlamaConfig,
    weight_type: GgmlType,
    seed: u64,
) -> Result<Vec<u8>, InferenceError> {
    build(cfg, weight_type, seed, true, ChatFamily::ChatMl)
}

/// Random quant bytes for a `cols x rows` matrix of `ty` with values of magnitude ~`scale`.
fn random_quant(ty: GgmlType, n: usize, scale: f32, rng: &mut SplitMix) -> Option<Vec<u8>> {
    let (block, head) = match ty {
        GgmlType::Q8_0 => (34, 2),
        GgmlType::Q4_0 => (18, 2),
        GgmlType::Q4_1 => (20, 4),
        _ => return None,
    };
    let blocks = n / 32;
    let mut out = vec![0u8; blocks * block];
    // Q8_0: q in -128..127 times d; Q4_0: (q - 8) d; Q4_1: q d + m with m = -8 d.
    let d = match ty {
        GgmlType::Q8_0 => scale / 127.0,
        _ => scale / 8.0,
    };
    let dh = crate::quant::f32_to_f16(d).to_le_bytes();
    let mh = crate::quant::f32_to_f16(-8.0 * d).to_le_bytes();
    for blk in out.chunks_exact_mut(block) {
        blk[..2].copy_from_slice(&dh);
        if head == 4 {
            blk[2..4].copy_from_slice(&mh);
        }
        for chunk in blk[head..].chunks_mut(8) {
            let r = rng.next().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }
    Some(out)
}

fn build(
    cfg: &LlamaConfig,
    weight_type: GgmlType,
    seed: u64,
    fast: bool,
    family: ChatFamily,
) -> Result<Vec<u8>, InferenceError> {
    if !weight_type.is_supported() {
        return Err(InferenceError::UnsupportedType {
            name: "synthetic weights".into(),
            ty: weight_type,
        });
    }
    let expected_style = match cfg.arch.as_str() {
        "llama" => RopeStyle::Norm,
        "qwen2" | "qwen3" => RopeStyle::Neox,
        other => {
            return Err(InferenceError::UnsupportedArchitecture(format!(
                "{other:?}"
            )));
        }
    };
    if cfg.rope_style != expected_style {
        return Err(InferenceError::InvalidArgument(format!(
            "architecture {} implies rope style {expected_style:?}",
            cfg.arch
        )));
    }
    if cfg.vocab < family.specials().len() + 256 + MERGES.len() {
        return Err(InferenceError::InvalidArgument(format!(
            "synthetic vocabulary needs at least {} tokens, config has {}",
            family.specials().len() + 256 + MERGES.len(),
            cfg.vocab
        )));
    }
    let bs = weight_type.block_size() as usize;
    for (what, v) in [
        ("dim", cfg.dim),
        ("ffn_dim", cfg.ffn_dim),
        ("q_dim", cfg.q_dim()),
    ] {
        if v % bs != 0 {
            return Err(InferenceError::InvalidArgument(format!(
                "{what} {v} is not a multiple of the {weight_type} block size {bs}"
            )));
        }
    }
    if cfg.n_heads == 0
        || cfg.n_kv_heads == 0
        || !cfg.n_heads.is_multiple_of(cfg.n_kv_heads)
        || !cfg.head_dim.is_multiple_of(2)
    {
        return Err(InferenceError::InvalidArgument(
            "n_heads must be a positive multiple of n_kv_heads and head_dim even".into(),
        ));
    }
    let arch = cfg.arch.as_str();
    let mut w = GgufWriter::new();
    let k = |s: &str| format!("{arch}.{s}");
    w.kv("general.architecture", Value::String(arch.into()))
        .kv("general.name", Value::String(format!("synthetic-{seed}")))
        .kv(&k("block_count"), Value::U32(cfg.n_layers as u32))
        .kv(&k("context_length"), Value::U32(cfg.context_len as u32))
        .kv(&k("embedding_length"), Value::U32(cfg.dim as u32))
        .kv(&k("feed_forward_length"), Value::U32(cfg.ffn_dim as u32))
        .kv(&k("attention.head_count"), Value::U32(cfg.n_heads as u32))
        .kv(
            &k("attention.head_count_kv"),
            Value::U32(cfg.n_kv_heads as u32),
        )
        .kv(&k("rope.freq_base"), Value::F32(cfg.rope_theta))
        .kv(
            &k("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_eps),
        )
        .kv(&k("vocab_size"), Value::U32(cfg.vocab as u32))
        .kv(&k("rope.dimension_count"), Value::U32(cfg.head_dim as u32));
    match cfg.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            w.kv(&k("rope.scaling.type"), Value::String("linear".into()))
                .kv(&k("rope.scaling.factor"), Value::F32(factor));
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_context,
        } => {
            w.kv(&k("rope.scaling.type"), Value::String("llama3".into()))
                .kv(&k("rope.scaling.factor"), Value::F32(factor))
                .kv(
                    &k("rope.scaling.low_freq_factor"),
                    Value::F32(low_freq_factor),
                )
                .kv(
                    &k("rope.scaling.high_freq_factor"),
                    Value::F32(high_freq_factor),
                )
                .kv(
                    &k("rope.scaling.original_context_length"),
                    Value::U32(original_context as u32),
                );
        }
    }
    if cfg.head_dim * cfg.n_heads != cfg.dim {
        w.kv(&k("attention.key_length"), Value::U32(cfg.head_dim as u32));
        w.kv(
            &k("attention.value_length"),
            Value::U32(cfg.head_dim as u32),
        );
    }
    let (tokens, types) = vocab(cfg.vocab, family);
    let (bos, eos) = family.bos_eos();
    w.kv("tokenizer.ggml.model", Value::String("gpt2".into()))
        .kv("tokenizer.ggml.pre", Value::String("smollm".into()))
        .kv(
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        )
        .kv(
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        )
        .kv(
            "tokenizer.ggml.merges",
            Value::Array(
                MERGES
                    .iter()
                    .map(|(a, b)| Value::String(format!("{a} {b}")))
                    .collect(),
            ),
        )
        .kv("tokenizer.ggml.bos_token_id", Value::U32(bos))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(eos))
        .kv("tokenizer.ggml.add_bos_token", Value::Bool(false))
        .kv(
            "tokenizer.chat_template",
            Value::String(family.template().into()),
        );

    let mut rng = SplitMix(seed ^ 0x5eed_5eed_5eed_5eed);
    let mut mat = |w: &mut GgufWriter, name: &str, cols: usize, rows: usize, scale: f32| {
        if fast && let Some(data) = random_quant(weight_type, cols * rows, scale, &mut rng) {
            w.tensor(name, &[cols as u64, rows as u64], weight_type, data);
            return;
        }
        let x: Vec<f32> = (0..cols * rows).map(|_| rng.unit() * scale).collect();
        let (ty, data) = match quantize(weight_type, &x) {
            Ok(d) => (weight_type, d),
            // Unreachable given the checks above; fall back to F32 rather than fail.
            Err(_) => (
                GgmlType::F32,
                x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        };
        w.tensor(name, &[cols as u64, rows as u64], ty, data);
    };
    let mut norm_rng = SplitMix(seed ^ 0x0a11_0a11);
    let mut vec_f32 = |w: &mut GgufWriter, name: &str, n: usize, base: f32, spread: f32| {
        let data: Vec<u8> = (0..n)
            .flat_map(|_| (base + norm_rng.unit() * spread).to_le_bytes())
            .collect();
        w.tensor(name, &[n as u64], GgmlType::F32, data);
    };
    let inv = |n: usize| (3.0 / n as f32).sqrt();
    mat(&mut w, "token_embd.weight", cfg.dim, cfg.vocab, 1.0);
    vec_f32(&mut w, "output_norm.weight", cfg.dim, 1.0, 0.1);
    if !cfg.tied_embeddings {
        mat(&mut w, "output.weight", cfg.dim, cfg.vocab, inv(cfg.dim));
    }
    for l in 0..cfg.n_layers {
        let n = |s: &str| format!("blk.{l}.{s}");
        vec_f32(&mut w, &n("attn_norm.weight"), cfg.dim, 1.0, 0.1);
        mat(
            &mut w,
            &n("attn_q.weight"),
            cfg.dim,
            cfg.q_dim(),
            inv(cfg.dim),
        );
        mat(
            &mut w,
            &n("attn_k.weight"),
            cfg.dim,
            cfg.kv_dim(),
            inv(cfg.dim),
        );
        mat(
            &mut w,
            &n("attn_v.weight"),
            cfg.dim,
            cfg.kv_dim(),
            inv(cfg.dim),
        );
        if cfg.arch == "qwen2" {
            vec_f32(&mut w, &n("attn_q.bias"), cfg.q_dim(), 0.0, 0.1);
            vec_f32(&mut w, &n("attn_k.bias"), cfg.kv_dim(), 0.0, 0.1);
            vec_f32(&mut w, &n("attn_v.bias"), cfg.kv_dim(), 0.0, 0.1);
        }
        if cfg.arch == "qwen3" {
            vec_f32(&mut w, &n("attn_q_norm.weight"), cfg.head_dim, 1.0, 0.2);
            vec_f32(&mut w, &n("attn_k_norm.weight"), cfg.head_dim, 1.0, 0.2);
        }
        mat(
            &mut w,
            &n("attn_output.weight"),
            cfg.q_dim(),
            cfg.dim,
            inv(cfg.q_dim()),
        );
        vec_f32(&mut w, &n("ffn_norm.weight"), cfg.dim, 1.0, 0.1);
        mat(
            &mut w,
            &n("ffn_gate.weight"),
            cfg.dim,
            cfg.ffn_dim,
            inv(cfg.dim),
        );
        mat(
            &mut w,
            &n("ffn_up.weight"),
            cfg.dim,
            cfg.ffn_dim,
            inv(cfg.dim),
        );
        mat(
            &mut w,
            &n("ffn_down.weight"),
            cfg.ffn_dim,
            cfg.dim,
            inv(cfg.ffn_dim),
        );
    }
    Ok(w.to_bytes())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::gguf::Gguf;

    #[test]
    fn fast_variant_is_valid_and_runs() {
        let cfg = LlamaConfig::tiny();
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::F16,
        ] {
            let a = synthetic_gguf_fast(&cfg, ty, 3).unwrap();
            assert_eq!(a, synthetic_gguf_fast(&cfg, ty, 3).unwrap());
            let g = Gguf::parse(&a).unwrap();
            let t = g.tensor("blk.0.ffn_down.weight").unwrap();
            assert_eq!(t.ty, ty);
            // Dequantized values are finite and of the intended magnitude (not all zero).
            let w = crate::model::LlamaWeights::from_gguf(&g).unwrap();
            let v = w.layers[0].ffn_down.to_f32().unwrap();
            assert!(v.iter().all(|x| x.is_finite()));
            let mean_abs = v.iter().map(|x| x.abs()).sum::<f32>() / v.len() as f32;
            assert!(mean_abs > 0.01 && mean_abs < 1.0, "{ty}: {mean_abs}");
            let mut cpu = crate::cpu::CpuBackend::new(&w, &Default::default()).unwrap();
            let logits = crate::Backend::forward(&mut cpu, &[3, 4], 0).unwrap();
            assert!(logits.iter().all(|x| x.is_finite()));
        }
    }

    #[test]
    fn deterministic_and_valid() {
        let cfg = LlamaConfig::tiny();
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
        ] {
            let a = synthetic_gguf(&cfg, ty, 3).unwrap();
            let b = synthetic_gguf(&cfg, ty, 3).unwrap();
            assert_eq!(a, b);
            let g = Gguf::parse(&a).unwrap();
            assert_eq!(g.tensor("blk.1.ffn_up.weight").unwrap().ty, ty);
            assert_eq!(
                g.get("tokenizer.ggml.tokens")
                    .unwrap()
                    .as_array()
                    .unwrap()
                    .len(),
                cfg.vocab
            );
        }
        assert_ne!(
            synthetic_gguf(&cfg, GgmlType::Q8_0, 1).unwrap(),
            synthetic_gguf(&cfg, GgmlType::Q8_0, 2).unwrap()
        );
    }

    #[test]
    fn rejects_bad_configs() {
        let mut cfg = LlamaConfig::tiny();
        cfg.vocab = 10;
        assert!(synthetic_gguf(&cfg, GgmlType::Q4_0, 0).is_err());
        let mut cfg = LlamaConfig::tiny();
        cfg.dim = 48;
        assert!(synthetic_gguf(&cfg, GgmlType::Q4_0, 0).is_err());
        assert!(synthetic_gguf(&LlamaConfig::tiny(), GgmlType::Q4_K, 0).is_err());
    }
}
