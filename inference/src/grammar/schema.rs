//! JSON Schema (the subset OpenAI's structured outputs use) → grammar nodes.
//!
//! Supported: `type` (one or a list), `object` (`properties` emitted in declaration order,
//! `required`, `additionalProperties` — only declared properties are ever generated; with
//! `strict` it must be `false`), `array` (`items`, `minItems`, `maxItems`), `string`,
//! `number`, `integer`, `boolean`, `null`, `enum`, `const`, `anyOf`/`oneOf` whose branches
//! start with different characters (e.g. a string, a number and null; integer + number
//! becomes number), `allOf` with one schema, `$ref` to `#/$defs/…` or `#/definitions/…`
//! (not recursive), and the annotations `title`, `description`, `default`, `examples`,
//! `$schema`, `$id`, `$comment`, `deprecated`, `readOnly`, `writeOnly`. Every other keyword
//! (`pattern`, `format`, `minimum`, `minLength`, `uniqueItems: true`, …) is an error naming
//! it and where it is, so nothing is silently dropped.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::GrammarError;
use super::machine::{LitTrie, Node, NodeId, Nodes, ObjectNode, Prop, set_intersects};

/// Largest schema accepted, serialized as JSON.
pub const MAX_SCHEMA_BYTES: usize = 32 * 1024;
/// Most grammar nodes one schema may compile to.
pub const MAX_NODES: usize = 4096;
/// Deepest nesting of schemas (objects, arrays, anyOf, $ref) inside one another.
pub const MAX_NESTING: usize = 16;
/// Most values in one `enum`.
pub const MAX_ENUM: usize = 1024;
/// Most properties in one object.
pub const MAX_PROPERTIES: usize = 512;
/// Largest `minItems` / `maxItems`.
pub const MAX_ITEMS: u64 = 4096;

const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
];

const KNOWN: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "uniqueItems",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "$defs",
    "definitions",
];

/// Keywords that belong to one type.
const OWNERS: &[(&str, &str)] = &[
    ("properties", "object"),
    ("required", "object"),
    ("additionalProperties", "object"),
    ("items", "array"),
    ("minItems", "array"),
    ("maxItems", "array"),
    ("uniqueItems", "array"),
];

/// Compiles JSON schemas into one node table.
pub struct Compiler<'a> {
    nodes: &'a mut Nodes,
    strict: bool,
    /// The document `$ref`s resolve against.
    doc: &'a Value,
    refs: HashMap<String, NodeId>,
    in_progress: Vec<String>,
    root_path: String,
}

fn err(path: &str, message: impl Into<String>) -> GrammarError {
    GrammarError {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// JSON type name of a value (`integer` for whole numbers).
fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_matches(v: &Value, ty: &str) -> bool {
    let t = type_of(v);
    t == ty || (ty == "number" && t == "integer")
}

impl<'a> Compiler<'a> {
    /// A compiler adding to `nodes`; `$ref`s resolve in `doc`.
    pub fn new(nodes: &'a mut Nodes, doc: &'a Value, strict: bool) -> Self {
        Compiler {
            nodes,
            strict,
            doc,
            refs: HashMap::new(),
            in_progress: Vec::new(),
            root_path: String::new(),
        }
    }

    /// Checks the size limit, then compiles `doc` itself.
    pub fn compile_root(&mut self, path: &str) -> Result<NodeId, GrammarError> {
        self.root_path = path.to_owned();
        let size = serde_json::to_string(self.doc).map_or(usize::MAX, |s| s.len());
        if size > MAX_SCHEMA_BYTES {
            return Err(err(
                path,
                format!(
                    "the schema is {size} bytes of JSON; at most {MAX_SCHEMA_BYTES} are supported"
                ),
            ));
        }
        let doc = self.doc;
        self.compile(doc, path, 0)
    }

    fn push(&mut self, node: Node, path: &str) -> Result<NodeId, GrammarError> {
        if self.nodes.len() >= MAX_NODES {
            return Err(err(
                path,
                format!("the schema is too large: it needs more than {MAX_NODES} grammar nodes"),
            ));
        }
        Ok(self.nodes.push(node))
    }

    /// A literal set node (`enum`, `const`, booleans, null) of these JSON values.
    fn literals(&mut self, values: &[Value], path: &str) -> Result<NodeId, GrammarError> {
        let lits: Vec<(Vec<u8>, Option<u32>)> = values
            .iter()
            .map(|v| (serde_json::to_vec(v).unwrap_or_default(), None))
            .collect();
        self.push(Node::Lits(LitTrie::new(&lits)), path)
    }

    /// Compiles one schema.
    pub fn compile(&mut self, s: &Value, path: &str, depth: usize) -> Result<NodeId, GrammarError> {
        if depth > MAX_NESTING {
            return Err(err(
                path,
                format!("schemas nest deeper than {MAX_NESTING} levels; flatten the schema"),
            ));
        }
        let m = match s {
            Value::Bool(true) => return Ok(self.nodes.any_value),
            Value::Bool(false) => {
                return Err(err(path, "the schema `false` allows no value"));
            }
            Value::Object(m) => m,
            _ => return Err(err(path, "a schema must be an object or a boolean")),
        };
        let mut keys: Vec<&String> = m.keys().collect();
        keys.sort();
        for k in keys {
            if ANNOTATIONS.contains(&k.as_str()) || KNOWN.contains(&k.as_str()) {
                continue;
            }
            return Err(err(
                path,
                format!(
                    "`{k}` is not supported in structured output (supported: type, properties, required, additionalProperties, items, minItems, maxItems, enum, const, anyOf/oneOf with branches of different types, allOf with one schema, $ref/$defs, and annotations); remove it"
                ),
            ));
        }
        let constraints: Vec<&str> = m
            .keys()
            .map(String::as_str)
            .filter(|k| !ANNOTATIONS.contains(k) && !["$defs", "definitions"].contains(k))
            .collect();
        if let Some(r) = m.get("$ref") {
            if constraints.len() > 1 {
                return Err(err(
                    path,
                    "`$ref` next to other constraints is not supported; move them into the referenced schema",
                ));
            }
            return self.reference(r, path, depth);
        }
        if let Some(all) = m.get("allOf") {
            match all.as_array().map(Vec::as_slice) {
                Some([one]) if constraints.len() == 1 => {
                    return self.compile(one, &format!("{path}/allOf/0"), depth + 1);
                }
                _ => {
                    return Err(err(
                        path,
                        "`allOf` is only supported with exactly one schema and nothing beside it",
                    ));
                }
            }
        }
        for kw in ["anyOf", "oneOf"] {
            if let Some(alts) = m.get(kw) {
                if constraints.len() > 1 {
                    return Err(err(
                        path,
                        format!(
                            "`{kw}` next to other constraints is not supported; put them into each branch"
                        ),
                    ));
                }
                let Some(alts) = alts.as_array().filter(|a| !a.is_empty()) else {
                    return Err(err(path, format!("`{kw}` must be a non-empty array")));
                };
                let mut ids = Vec::new();
                for (i, a) in alts.iter().enumerate() {
                    ids.push(self.compile(a, &format!("{path}/{kw}/{i}"), depth + 1)?);
                }
                return self.any_of(ids, path, kw);
            }
        }
        let types: Vec<String> = match m.get("type") {
            None => Vec::new(),
            Some(Value::String(t)) => vec![t.clone()],
            Some(Value::Array(a)) => {
                let mut v = Vec::new();
                for t in a {
                    match t.as_str() {
                        Some(t) => v.push(t.to_owned()),
                        None => {
                            return Err(err(path, "`type` must be a string or a list of strings"));
                        }
                    }
                }
                v
            }
            Some(_) => return Err(err(path, "`type` must be a string or a list of strings")),
        };
        for t in &types {
            if ![
                "object", "array", "string", "number", "integer", "boolean", "null",
            ]
            .contains(&t.as_str())
            {
                return Err(err(path, format!("unknown type `{t}`")));
            }
        }
        // enum / const: the literal values (restricted to `type` when given).
        let literal_values = match (m.get("enum"), m.get("const")) {
            (Some(_), Some(_)) => {
                return Err(err(path, "`enum` and `const` together are not supported"));
            }
            (Some(Value::Array(vals)), None) => Some(vals.clone()),
            (Some(_), None) => return Err(err(path, "`enum` must be an array")),
            (None, Some(c)) => Some(vec![c.clone()]),
            (None, None) => None,
        };
        if let Some(vals) = literal_values {
            if vals.len() > MAX_ENUM {
                return Err(err(
                    path,
                    format!(
                        "`enum` has {} values; at most {MAX_ENUM} are supported",
                        vals.len()
                    ),
                ));
            }
            let vals: Vec<Value> = vals
                .into_iter()
                .filter(|v| types.is_empty() || types.iter().any(|t| type_matches(v, t)))
                .collect();
            if vals.is_empty() {
                return Err(err(path, "no `enum`/`const` value has the schema's `type`"));
            }
            return self.literals(&vals, path);
        }
        if types.len() > 1 {
            for (kw, owner) in OWNERS {
                if m.contains_key(*kw) && !types.iter().any(|t| t == owner) {
                    return Err(err(
                        path,
                        format!("`{kw}` applies to {owner}s, which the type list does not include"),
                    ));
                }
            }
            let mut ids = Vec::new();
            for t in &types {
                let mut one = m.clone();
                one.insert("type".into(), Value::String(t.clone()));
                ids.push(self.typed(t, &one, path, depth, false)?);
            }
            return self.any_of(ids, path, "type");
        }
        let ty = match types.first() {
            Some(t) => t.as_str(),
            None if m.contains_key("properties") || m.contains_key("additionalProperties") => {
                "object"
            }
            None if m.contains_key("items") => "array",
            None => return Ok(self.nodes.any_value),
        };
        self.typed(ty, m, path, depth, true)
    }

    fn typed(
        &mut self,
        ty: &str,
        m: &Map<String, Value>,
        path: &str,
        depth: usize,
        check_owners: bool,
    ) -> Result<NodeId, GrammarError> {
        // Keywords of another type than this one are errors, not silent no-ops (with a list
        // of types, each keyword applies to its own type's branch).
        if check_owners {
            for (kw, owner) in OWNERS {
                if m.contains_key(*kw) && *owner != ty {
                    return Err(err(
                        path,
                        format!("`{kw}` applies to {owner}s, but the type is {ty}"),
                    ));
                }
            }
        }
        match ty {
            "object" => self.object(m, path, depth),
            "array" => self.array(m, path, depth),
            "string" => Ok(self.nodes.string),
            "number" => Ok(self.nodes.number),
            "integer" => self.push(Node::Number { integer: true }, path),
            "boolean" => self.literals(&[Value::Bool(true), Value::Bool(false)], path),
            _ => self.literals(&[Value::Null], path),
        }
    }

    fn object(
        &mut self,
        m: &Map<String, Value>,
        path: &str,
        depth: usize,
    ) -> Result<NodeId, GrammarError> {
        let additional = m.get("additionalProperties");
        let closed = additional == Some(&Value::Bool(false));
        if self.strict && !closed {
            return Err(err(
                path,
                "with `strict: true` every object needs `additionalProperties: false`",
            ));
        }
        if let Some(a) = additional
            && !a.is_boolean()
            && !a.is_object()
        {
            return Err(err(
                path,
                "`additionalProperties` must be a boolean or a schema",
            ));
        }
        let props = match m.get("properties") {
            None => Map::new(),
            Some(Value::Object(p)) => p.clone(),
            Some(_) => return Err(err(path, "`properties` must be an object")),
        };
        if props.len() > MAX_PROPERTIES {
            return Err(err(
                path,
                format!(
                    "the object has {} properties; at most {MAX_PROPERTIES} are supported",
                    props.len()
                ),
            ));
        }
        let required: Vec<String> = match m.get("required") {
            None => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| err(path, "`required` must be a list of property names"))?,
            Some(_) => return Err(err(path, "`required` must be a list of property names")),
        };
        for r in &required {
            if !props.contains_key(r) {
                return Err(err(
                    path,
                    format!(
                        "`required` names `{r}`, which is not in `properties`; declare it there"
                    ),
                ));
            }
        }
        // No declared properties and extra ones allowed: a free-form object (only when the
        // extra values may be anything; with a schema for them, `{}` is the valid output).
        if props.is_empty() && (additional.is_none() || additional == Some(&Value::Bool(true))) {
            return Ok(self.nodes.any_object);
        }
        let mut out = Vec::with_capacity(props.len());
        for (k, v) in &props {
            let node = self.compile(
                v,
                &format!(
                    "{path}/properties/{}",
                    k.replace('~', "~0").replace('/', "~1")
                ),
                depth + 1,
            )?;
            out.push(Prop {
                key: serde_json::to_vec(k).unwrap_or_default(),
                node,
                required: required.contains(k),
            });
        }
        let lits: Vec<(Vec<u8>, Option<u32>)> = out
            .iter()
            .enumerate()
            .map(|(i, p)| (p.key[1..].to_vec(), Some(i as u32)))
            .collect();
        let mut next_required = vec![out.len() as u32; out.len() + 1];
        for i in (0..out.len()).rev() {
            next_required[i] = if out[i].required {
                i as u32
            } else {
                next_required[i + 1]
            };
        }
        self.push(
            Node::Object(ObjectNode {
                props: out,
                keys: LitTrie::new(&lits),
                next_required,
                tail: Vec::new(),
            }),
            path,
        )
    }

    fn array(
        &mut self,
        m: &Map<String, Value>,
        path: &str,
        depth: usize,
    ) -> Result<NodeId, GrammarError> {
        match m.get("uniqueItems") {
            None | Some(Value::Bool(false)) => {}
            Some(_) => {
                return Err(err(
                    path,
                    "`uniqueItems: true` is not supported; remove it (or set it to false)",
                ));
            }
        }
        let item = match m.get("items") {
            None => self.nodes.any_value,
            Some(Value::Array(_)) => {
                return Err(err(
                    path,
                    "tuple `items` (an array of schemas) is not supported; use one schema",
                ));
            }
            Some(s) => self.compile(s, &format!("{path}/items"), depth + 1)?,
        };
        let bound = |k: &str| -> Result<Option<u32>, GrammarError> {
            match m.get(k) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) if n <= MAX_ITEMS => Ok(Some(n as u32)),
                    _ => Err(err(
                        path,
                        format!("`{k}` must be an integer between 0 and {MAX_ITEMS}"),
                    )),
                },
            }
        };
        let min = bound("minItems")?.unwrap_or(0);
        let max = bound("maxItems")?;
        if max.is_some_and(|x| x < min) {
            return Err(err(path, "`maxItems` is smaller than `minItems`"));
        }
        self.push(Node::Array { item, min, max }, path)
    }

    fn reference(&mut self, r: &Value, path: &str, depth: usize) -> Result<NodeId, GrammarError> {
        let Some(r) = r.as_str() else {
            return Err(err(path, "`$ref` must be a string"));
        };
        if let Some(&id) = self.refs.get(r) {
            return Ok(id);
        }
        if self.in_progress.iter().any(|x| x == r) {
            return Err(err(
                path,
                format!("`$ref` {r:?} is recursive; recursive schemas are not supported"),
            ));
        }
        let target = r
            .strip_prefix("#/$defs/")
            .map(|n| ("$defs", n))
            .or_else(|| r.strip_prefix("#/definitions/").map(|n| ("definitions", n)))
            .and_then(|(section, name)| {
                let name = name.replace("~1", "/").replace("~0", "~");
                self.doc.get(section)?.get(name)
            })
            .or_else(|| (r == "#").then_some(self.doc));
        let Some(target) = target else {
            return Err(err(
                path,
                format!(
                    "`$ref` {r:?} does not resolve; only references to #/$defs/NAME or #/definitions/NAME of the same schema are supported"
                ),
            ));
        };
        self.in_progress.push(r.to_owned());
        let at = format!("{}{}", self.root_path, r.trim_start_matches('#'));
        let id = self.compile(target, &at, depth + 1);
        self.in_progress.pop();
        let id = id?;
        self.refs.insert(r.to_owned(), id);
        Ok(id)
    }

    fn any_of(
        &mut self,
        mut ids: Vec<NodeId>,
        path: &str,
        kw: &str,
    ) -> Result<NodeId, GrammarError> {
        // integer + number: number covers both.
        let has_number = ids
            .iter()
            .any(|&i| matches!(self.nodes.get(i), Node::Number { integer: false }));
        if has_number {
            ids.retain(|&i| !matches!(self.nodes.get(i), Node::Number { integer: true }));
        }
        ids.dedup();
        if ids.len() == 1 {
            return Ok(ids[0]);
        }
        for i in 0..ids.len() {
            for j in i + 1..ids.len() {
                if set_intersects(
                    &self.nodes.first[ids[i] as usize],
                    &self.nodes.first[ids[j] as usize],
                ) {
                    return Err(err(
                        path,
                        format!(
                            "`{kw}` branches {i} and {j} can start with the same character (e.g. two objects, or a string and a string enum); only branches of different types are supported — merge them into one schema"
                        ),
                    ));
                }
            }
        }
        self.push(Node::AnyOf(ids), path)
    }
}
