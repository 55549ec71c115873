//! Mutations of bytes and of JSON documents, shared by the targets.

use super::*;

// ---------------------------------------------------------------------------------------------
// Mutations: bytes
// ---------------------------------------------------------------------------------------------

/// Edge values written over 1, 2, 4 or 8 bytes.
pub(crate) const WORDS: [u64; 16] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0x8000,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

#[derive(Clone, Debug)]
pub(crate) enum ByteOp {
    /// Flip one bit (index, bit); `head`: index inside the first `head` bytes of the seed.
    Flip {
        at: Index,
        bit: u8,
        head: bool,
    },
    Set {
        at: Index,
        value: u8,
        head: bool,
    },
    Insert {
        at: Index,
        bytes: Vec<u8>,
        head: bool,
    },
    Delete {
        at: Index,
        len: usize,
        head: bool,
    },
    Truncate {
        at: Index,
    },
    /// Overwrite `width` bytes with an edge value (`WORDS[word]` or `random`).
    Word {
        at: Index,
        word: Option<usize>,
        random: u64,
        width: u8,
        big_endian: bool,
        head: bool,
    },
    /// Copy a chunk of the input over another place (repeats structures).
    Splice {
        from: Index,
        to: Index,
        len: usize,
    },
}

pub(crate) fn byte_op() -> impl Strategy<Value = ByteOp> {
    prop_oneof![
        (any::<Index>(), 0u8..8, any::<bool>()).prop_map(|(at, bit, head)| ByteOp::Flip { at, bit, head }),
        (any::<Index>(), any::<u8>(), any::<bool>()).prop_map(|(at, value, head)| ByteOp::Set { at, value, head }),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16), any::<bool>())
            .prop_map(|(at, bytes, head)| ByteOp::Insert { at, bytes, head }),
        (any::<Index>(), 1usize..64, any::<bool>()).prop_map(|(at, len, head)| ByteOp::Delete { at, len, head }),
        any::<Index>().prop_map(|at| ByteOp::Truncate { at }),
        (
            any::<Index>(),
            prop::option::weighted(0.8, 0..WORDS.len()),
            any::<u64>(),
            prop::sample::select(vec![1u8, 2, 4, 8]),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(at, word, random, width, big_endian, head)| ByteOp::Word {
                at,
                word,
                random,
                width,
                big_endian,
                head
            }),
        (any::<Index>(), any::<Index>(), 1usize..256).prop_map(|(from, to, len)| ByteOp::Splice { from, to, len }),
    ]
}

pub(crate) fn byte_ops(max: usize) -> impl Strategy<Value = Vec<ByteOp>> {
    prop::collection::vec(byte_op(), 1..=max)
}

/// Applies `ops`; "head" indexes fall in the first `head` bytes (the header of a file).
pub(crate) fn mutate_bytes(mut b: Vec<u8>, ops: &[ByteOp], head: usize) -> Vec<u8> {
    let pos = |b: &Vec<u8>, at: &Index, in_head: bool, extra: usize| {
        let n = if in_head { b.len().min(head.max(1)) } else { b.len() } + extra;
        at.index(n.max(1))
    };
    for op in ops {
        match op {
            ByteOp::Flip { at, bit, head } if !b.is_empty() => {
                let i = pos(&b, at, *head, 0).min(b.len() - 1);
                b[i] ^= 1 << bit;
            }
            ByteOp::Set { at, value, head } if !b.is_empty() => {
                let i = pos(&b, at, *head, 0).min(b.len() - 1);
                b[i] = *value;
            }
            ByteOp::Insert { at, bytes, head } => {
                let i = pos(&b, at, *head, 1).min(b.len());
                b.splice(i..i, bytes.iter().copied());
            }
            ByteOp::Delete { at, len, head } if !b.is_empty() => {
                let i = pos(&b, at, *head, 0).min(b.len() - 1);
                let end = (i + len).min(b.len());
                b.drain(i..end);
            }
            ByteOp::Truncate { at } => {
                let i = at.index(b.len() + 1);
                b.truncate(i);
            }
            ByteOp::Word { at, word, random, width, big_endian, head } => {
                let w = *width as usize;
                if b.len() >= w {
                    let i = pos(&b, at, *head, 0).min(b.len() - w);
                    let v = word.map_or(*random, |k| WORDS[k]);
                    let bytes = if *big_endian { v.to_be_bytes() } else { v.to_le_bytes() };
                    let bytes = if *big_endian { &bytes[8 - w..] } else { &bytes[..w] };
                    b[i..i + w].copy_from_slice(bytes);
                }
            }
            ByteOp::Splice { from, to, len } if !b.is_empty() => {
                let f = from.index(b.len());
                let chunk: Vec<u8> = b[f..(f + len).min(b.len())].to_vec();
                let t = to.index(b.len());
                let end = (t + chunk.len()).min(b.len());
                b.splice(t..end, chunk);
            }
            _ => {}
        }
    }
    b
}

// ---------------------------------------------------------------------------------------------
// Mutations: JSON
// ---------------------------------------------------------------------------------------------

/// Values that break typed readers: wrong types, edge numbers, odd strings, deep nesting.
pub(crate) fn interesting(k: usize, random: i64, extra: &[Value]) -> Value {
    let deep = |n: usize| (0..n).fold(json!(1), |v, _| json!([v]));
    let base: Vec<Value> = vec![
        Value::Null,
        json!(true),
        json!(false),
        json!(0),
        json!(1),
        json!(2),
        json!(3),
        json!(-1),
        json!(-2147483648i64),
        json!(16),
        json!(2147483648u64),
        json!(4294967295u64),
        json!(4294967296u64),
        json!(9007199254740993u64),
        json!(i64::MAX),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(0.5),
        json!(-0.0),
        json!(1e308),
        json!(-1e308),
        json!(1e-320),
        json!(3.0),
        json!(1e19),
        json!(""),
        json!("a"),
        json!("\u{0}"),
        json!("é💥\u{202e}\u{ffff}"),
        json!("-1"),
        json!("1e999"),
        json!("null"),
        json!([]),
        json!([0]),
        json!([1, 2, 3]),
        json!(["x", null]),
        json!([u64::MAX, -1]),
        json!({}),
        json!({"a": 1}),
        json!(random),
        json!(random as f64 / 7.0),
        json!(random.rem_euclid(64)),
        deep(40),
        json!("x".repeat(5000)),
    ];
    let all = base.len() + extra.len();
    let k = k % all;
    if k < base.len() {
        base[k].clone()
    } else {
        extra[k - base.len()].clone()
    }
}

#[derive(Clone, Debug)]
pub(crate) enum JsonOp {
    Replace {
        path: Vec<Index>,
        value: usize,
        random: i64,
    },
    Remove {
        path: Vec<Index>,
    },
    Insert {
        path: Vec<Index>,
        key: Index,
        value: usize,
        random: i64,
    },
    Retype {
        path: Vec<Index>,
    },
    /// Wrap the node in `depth` arrays.
    Nest {
        path: Vec<Index>,
        depth: usize,
    },
}

pub(crate) fn json_path() -> impl Strategy<Value = Vec<Index>> {
    prop::collection::vec(any::<Index>(), 0..5)
}

pub(crate) fn json_op() -> impl Strategy<Value = JsonOp> {
    prop_oneof![
        4 => (json_path(), any::<usize>(), any::<i64>()).prop_map(|(path, value, random)| JsonOp::Replace { path, value, random }),
        2 => json_path().prop_map(|path| JsonOp::Remove { path }),
        2 => (json_path(), any::<Index>(), any::<usize>(), any::<i64>())
            .prop_map(|(path, key, value, random)| JsonOp::Insert { path, key, value, random }),
        2 => json_path().prop_map(|path| JsonOp::Retype { path }),
        1 => (json_path(), prop::sample::select(vec![1usize, 2, 140])).prop_map(|(path, depth)| JsonOp::Nest { path, depth }),
    ]
}

#[derive(Clone, Debug)]
pub(crate) enum Step {
    Key(String),
    At(usize),
}

/// The steps `path` selects: at each level an object key or an array element (stops at a leaf).
pub(crate) fn steps(v: &Value, path: &[Index]) -> Vec<Step> {
    let mut out = Vec::new();
    let mut cur = v;
    for ix in path {
        match cur {
            Value::Object(m) if !m.is_empty() => {
                let (k, next) = m.iter().nth(ix.index(m.len())).unwrap();
                out.push(Step::Key(k.clone()));
                cur = next;
            }
            Value::Array(a) if !a.is_empty() => {
                let i = ix.index(a.len());
                out.push(Step::At(i));
                cur = &a[i];
            }
            _ => break,
        }
    }
    out
}

pub(crate) fn node<'a>(mut v: &'a mut Value, steps: &[Step]) -> &'a mut Value {
    for s in steps {
        v = match s {
            Step::Key(k) => v.get_mut(k.as_str()).unwrap(),
            Step::At(i) => v.get_mut(*i).unwrap(),
        };
    }
    v
}

/// Applies JSON mutations; `keys` are names worth inserting (known fields), `extra` more values.
pub(crate) fn mutate_json(mut v: Value, ops: &[JsonOp], keys: &[&str], extra: &[Value]) -> Value {
    for op in ops {
        match op {
            JsonOp::Replace { path, value, random } => {
                let s = steps(&v, path);
                *node(&mut v, &s) = interesting(*value, *random, extra);
            }
            JsonOp::Remove { path } => {
                let s = steps(&v, path);
                if let Some((last, parent)) = s.split_last() {
                    match (node(&mut v, parent), last) {
                        (Value::Object(m), Step::Key(k)) => {
                            m.remove(k);
                        }
                        (Value::Array(a), Step::At(i)) => {
                            a.remove(*i);
                        }
                        _ => {}
                    }
                }
            }
            JsonOp::Insert { path, key, value, random } => {
                let s = steps(&v, path);
                let val = interesting(*value, *random, extra);
                let n = node(&mut v, &s);
                let key_name = if keys.is_empty() { "x".to_string() } else { keys[key.index(keys.len())].to_string() };
                match n {
                    Value::Object(m) => {
                        m.insert(key_name, val);
                    }
                    Value::Array(a) => {
                        let i = key.index(a.len() + 1);
                        a.insert(i, val);
                    }
                    other => *other = json!({ key_name: val }),
                }
            }
            JsonOp::Retype { path } => {
                let s = steps(&v, path);
                let n = node(&mut v, &s);
                *n = match n.take() {
                    Value::Number(x) => Value::String(x.to_string()),
                    Value::String(x) => x
                        .parse::<f64>()
                        .ok()
                        .and_then(serde_json::Number::from_f64)
                        .map_or(json!(x.len()), Value::Number),
                    Value::Bool(b) => json!(b as i64),
                    Value::Array(mut a) if !a.is_empty() => a.swap_remove(0),
                    Value::Array(_) => Value::Null,
                    Value::Object(m) => Value::Array(m.into_iter().map(|(_, x)| x).collect()),
                    Value::Null => json!({}),
                };
            }
            JsonOp::Nest { path, depth } => {
                let s = steps(&v, path);
                let n = node(&mut v, &s);
                let mut inner = n.take();
                for _ in 0..*depth {
                    inner = json!([inner]);
                }
                *n = inner;
            }
        }
    }
    v
}

/// A mutated JSON file: JSON-level edits, then (sometimes) raw text corruption.
#[derive(Clone, Debug)]
pub(crate) struct JsonMut {
    ops: Vec<JsonOp>,
    bytes: Vec<ByteOp>,
}

pub(crate) fn json_mut() -> impl Strategy<Value = JsonMut> {
    (
        prop_oneof![3 => prop::collection::vec(json_op(), 1..=1), 1 => prop::collection::vec(json_op(), 2..5)],
        prop_oneof![4 => Just(Vec::new()), 1 => byte_ops(3)],
    )
        .prop_map(|(ops, bytes)| JsonMut { ops, bytes })
}

pub(crate) fn apply_json(seed: &Value, m: &JsonMut, keys: &[&str], extra: &[Value]) -> Vec<u8> {
    let v = mutate_json(seed.clone(), &m.ops, keys, extra);
    let text = serde_json::to_vec_pretty(&v).unwrap();
    if m.bytes.is_empty() {
        text
    } else {
        mutate_bytes(text, &m.bytes, usize::MAX)
    }
}
