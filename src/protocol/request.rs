//! Reading the few fields of a request body the gateway checks, without
//! building its JSON tree, and the checks all protocols share.

use std::borrow::Cow;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The most choices (`n`) a chat request may ask for: OpenAI's own limit.
/// A continuation asks again for each unfinished one.
pub const MAX_CHOICES: u64 = 128;

/// What the relay needs from a valid request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary<'a> {
    pub model: Cow<'a, str>,
    /// `stream: true`: relayed as a stream; else passed through.
    pub stream: bool,
    /// The request declares tools (`tools`, or the older `functions`): its
    /// answer may call one, so its stream is read for tool calls.
    pub tools: bool,
    /// `background: true` (OpenAI Responses): generated whether or not a
    /// client is attached.
    pub background: bool,
}

/// Why a request body is refused (a 400 in the protocol's shape).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request body is not valid JSON: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("{0}")]
    Invalid(&'static str),
}

/// Refuse a body the provider should never see: bytes that are not UTF-8
/// (validation skips the values it does not check, so it would not see
/// them) and arrays or objects nested deeper than `max_depth` (the
/// values validation skips are skipped without a depth limit). One pass
/// over the bytes, no tree.
pub fn check_structure(body: &[u8], max_depth: usize) -> Result<(), RequestError> {
    if std::str::from_utf8(body).is_err() {
        return Err(RequestError::Invalid("the request body is not valid UTF-8"));
    }
    let mut depth = 0usize;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                // Skip the string: to its closing quote, over escapes.
                i += 1;
                loop {
                    let Some(j) = memchr::memchr2(b'"', b'\\', body.get(i..).unwrap_or_default())
                    else {
                        // An unterminated string: the parser says so.
                        return Ok(());
                    };
                    if body[i + j] == b'\\' {
                        i += j + 2;
                    } else {
                        i += j;
                        break;
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(RequestError::Invalid(
                        "the request body nests JSON deeper than the gateway allows (limits.max_json_depth)",
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Read `body`'s checked fields; a body that is not a JSON object is refused.
pub fn read(body: &[u8]) -> Result<Fields<'_>, RequestError> {
    let top = serde_json::from_slice::<Top>(body).map_err(RequestError::Malformed)?;
    match top.0 {
        Shape::Object(fields) => Ok(*fields),
        _ => Err(RequestError::Invalid(
            "the request body must be a JSON object",
        )),
    }
}

/// A chat request (`model` and `messages`, as OpenAI chat and Anthropic
/// Messages both take them), with `max_tokens` where the protocol demands it.
pub fn chat(body: &[u8], max_tokens_required: bool) -> Result<Summary<'_>, RequestError> {
    let mut fields = read(body)?;
    let model = fields.take_model()?;
    fields.require_messages()?;
    if max_tokens_required {
        fields.require_max_tokens()?;
    }
    fields.check_choices()?;
    let stream = fields.stream()?;
    let tools = matches!(fields.tools, Some(Shape::Array { empty: false }));
    Ok(Summary {
        model,
        stream,
        tools,
        background: false,
    })
}

/// An OpenAI Responses request: `model`, and `input` as a non-empty
/// string or a non-empty array of items; `background` a boolean.
pub fn responses(body: &[u8]) -> Result<Summary<'_>, RequestError> {
    let mut fields = read(body)?;
    let model = fields.take_model()?;
    match fields.input {
        Some(Shape::Array { empty: false }) => {}
        Some(Shape::Str(ref s)) if !s.is_empty() => {}
        Some(Shape::Array { empty: true }) | Some(Shape::Str(_)) => {
            return Err(RequestError::Invalid("`input` must not be empty"));
        }
        Some(_) => {
            return Err(RequestError::Invalid(
                "`input` must be a string or an array of input items",
            ));
        }
        None => return Err(RequestError::Invalid("missing required field `input`")),
    }
    let stream = fields.stream()?;
    let background = match fields.background {
        None | Some(Shape::Null) => false,
        Some(Shape::Bool(b)) => b,
        Some(_) => return Err(RequestError::Invalid("`background` must be a boolean")),
    };
    let tools = matches!(fields.tools, Some(Shape::Array { empty: false }));
    Ok(Summary {
        model,
        stream,
        tools,
        background,
    })
}

impl<'a> Fields<'a> {
    /// `model`: a non-empty string (taken out of the fields).
    pub fn take_model(&mut self) -> Result<Cow<'a, str>, RequestError> {
        match self.model.take() {
            Some(Shape::Str(m)) if !m.is_empty() => Ok(m),
            Some(_) => Err(RequestError::Invalid("`model` must be a non-empty string")),
            None => Err(RequestError::Invalid("missing required field `model`")),
        }
    }

    /// `messages`: a non-empty array.
    pub fn require_messages(&self) -> Result<(), RequestError> {
        match self.messages {
            Some(Shape::Array { empty: false }) => Ok(()),
            Some(Shape::Array { empty: true }) => {
                Err(RequestError::Invalid("`messages` must not be empty"))
            }
            Some(_) => Err(RequestError::Invalid("`messages` must be an array")),
            None => Err(RequestError::Invalid("missing required field `messages`")),
        }
    }

    /// `max_tokens`: a whole number.
    pub fn require_max_tokens(&self) -> Result<(), RequestError> {
        match self.max_tokens {
            Some(Shape::Unsigned(_)) => Ok(()),
            _ => Err(RequestError::Invalid("missing required field `max_tokens`")),
        }
    }

    /// `n`: absent, `null`, or a whole number from 1 to [`MAX_CHOICES`].
    pub fn check_choices(&self) -> Result<(), RequestError> {
        match self.n {
            None | Some(Shape::Null) => Ok(()),
            Some(Shape::Unsigned(n)) if (1..=MAX_CHOICES).contains(&n) => Ok(()),
            Some(_) => Err(RequestError::Invalid(
                "`n` must be a whole number from 1 to 128",
            )),
        }
    }

    /// `stream`: a boolean, `null` or absent (false).
    pub fn stream(&self) -> Result<bool, RequestError> {
        match self.stream {
            None | Some(Shape::Null) => Ok(false),
            Some(Shape::Bool(b)) => Ok(b),
            Some(_) => Err(RequestError::Invalid("`stream` must be a boolean")),
        }
    }
}

/// The request body as validation reads it: an object's checked
/// fields, each reduced to its [`Shape`], and nothing else kept. Rule: no
/// JSON tree of the whole body (benches/OPTIMISATIONS.md, "validation").
/// A repeated key counts by its last value, as it would in a parsed object.
struct Top<'a>(Shape<'a>);

#[derive(Default)]
pub struct Fields<'a> {
    model: Option<Shape<'a>>,
    messages: Option<Shape<'a>>,
    max_tokens: Option<Shape<'a>>,
    stream: Option<Shape<'a>>,
    tools: Option<Shape<'a>>,
    input: Option<Shape<'a>>,
    background: Option<Shape<'a>>,
    n: Option<Shape<'a>>,
}

/// What validation needs to know of a JSON value.
enum Shape<'a> {
    Str(Cow<'a, str>),
    Array {
        empty: bool,
    },
    Bool(bool),
    /// An integer that fits `u64`.
    Unsigned(u64),
    Null,
    /// The body's own object (only at the top: a nested one is `Other`).
    Object(Box<Fields<'a>>),
    /// A nested object, a negative or fractional number.
    Other,
}

impl<'de> Deserialize<'de> for Top<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ShapeVisitor { top: true }).map(Top)
    }
}

impl<'de> Deserialize<'de> for Shape<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ShapeVisitor { top: false })
    }
}

enum Key {
    Model,
    Messages,
    MaxTokens,
    Stream,
    Tools,
    Input,
    Background,
    N,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "model" => Key::Model,
                    "messages" => Key::Messages,
                    "max_tokens" => Key::MaxTokens,
                    "stream" => Key::Stream,
                    "tools" | "functions" => Key::Tools,
                    "input" => Key::Input,
                    "background" => Key::Background,
                    "n" => Key::N,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// Reads one value as its [`Shape`]; `top`: the body itself, whose
/// object's checked fields are kept.
struct ShapeVisitor {
    top: bool,
}

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = Shape<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Shape<'de>, E> {
        Ok(Shape::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Shape<'de>, E> {
        Ok(if let Ok(n) = u64::try_from(n) {
            Shape::Unsigned(n)
        } else {
            Shape::Other
        })
    }
    fn visit_u64<E>(self, n: u64) -> Result<Shape<'de>, E> {
        Ok(Shape::Unsigned(n))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Shape<'de>, E> {
        Ok(Shape::Other)
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Shape<'de>, E> {
        Ok(Shape::Str(s.into()))
    }
    fn visit_str<E>(self, s: &str) -> Result<Shape<'de>, E> {
        Ok(Shape::Str(s.to_owned().into()))
    }
    fn visit_unit<E>(self) -> Result<Shape<'de>, E> {
        Ok(Shape::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape<'de>, A::Error> {
        let empty = seq.next_element::<IgnoredAny>()?.is_none();
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Shape::Array { empty })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape<'de>, A::Error> {
        if !self.top {
            return IgnoredAny.visit_map(map).map(|_| Shape::Other);
        }
        let mut fields = Fields::default();
        while let Some(key) = map.next_key::<Key>()? {
            let slot = match key {
                Key::Model => &mut fields.model,
                Key::Messages => &mut fields.messages,
                Key::MaxTokens => &mut fields.max_tokens,
                Key::Stream => &mut fields.stream,
                Key::Tools => &mut fields.tools,
                Key::Input => &mut fields.input,
                Key::Background => &mut fields.background,
                Key::N => &mut fields.n,
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value()?);
        }
        Ok(Shape::Object(Box::new(fields)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> Vec<u8> {
        let mut b = b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":".to_vec();
        b.extend(std::iter::repeat_n(b'[', depth));
        b.extend(std::iter::repeat_n(b']', depth));
        b.extend(b"}]}");
        b
    }

    #[test]
    fn deep_nesting_and_invalid_utf8_are_refused() {
        // 3 levels of the request's own, then `depth` arrays.
        assert!(check_structure(&nested(61), 64).is_ok());
        assert!(check_structure(&nested(62), 64).is_err());
        assert!(check_structure(&nested(100_000), 64).is_err());
        // Brackets inside strings, escaped quotes, do not count.
        let text = br#"{"a":"[[[[[[[[[[\"{{{{{{{{","b":[{"c":"]]]]"}],"d":{"e":[1,[2]]}}"#;
        assert!(check_structure(text, 4).is_ok());
        assert!(check_structure(text, 2).is_err());
        // Siblings do not add up.
        let wide = format!("[{}]", vec!["[[1]]"; 1000].join(","));
        assert!(check_structure(wide.as_bytes(), 3).is_ok());
        let bad = b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}";
        assert!(check_structure(bad, 64).is_err());
        // Validation alone lets both through: what this check is for.
        assert!(chat(&nested(100_000), false).is_ok());
        assert!(chat(bad, false).is_ok());
    }

    /// How validation sees a body: each checked field's shape, as text.
    fn read(json: &str) -> Result<Option<[String; 4]>, String> {
        fn show(s: &Option<Shape>) -> String {
            match s {
                None => "-".into(),
                Some(Shape::Str(s)) => format!("str {s}"),
                Some(Shape::Array { empty }) => format!("array empty={empty}"),
                Some(Shape::Bool(b)) => format!("bool {b}"),
                Some(Shape::Unsigned(_)) => "unsigned".into(),
                Some(Shape::Null) => "null".into(),
                Some(Shape::Object(_)) => "object".into(),
                Some(Shape::Other) => "other".into(),
            }
        }
        let top: Top = serde_json::from_str(json).map_err(|e| e.to_string())?;
        Ok(match top.0 {
            Shape::Object(f) => Some([
                show(&f.model),
                show(&f.messages),
                show(&f.max_tokens),
                show(&f.stream),
            ]),
            _ => None,
        })
    }

    #[test]
    fn reads_the_checked_fields_and_skips_the_rest() {
        let got = read(
            r#"{"model":"m\u00e9","pad":{"a":[1,{"b":null}]},"messages":[{"role":"user","content":"hi"}],"max_tokens":64,"stream":true}"#,
        );
        assert_eq!(
            got,
            Ok(Some([
                "str mé".into(),
                "array empty=false".into(),
                "unsigned".into(),
                "bool true".into()
            ]))
        );
        let got = read(r#"{"model":"","messages":[],"max_tokens":-1,"stream":null}"#);
        assert_eq!(
            got,
            Ok(Some([
                "str ".into(),
                "array empty=true".into(),
                "other".into(),
                "null".into()
            ]))
        );
        let got = read(r#"{"model":7,"messages":{},"max_tokens":1.5,"stream":"yes"}"#);
        assert_eq!(
            got,
            Ok(Some([
                "unsigned".into(),
                "other".into(),
                "other".into(),
                "str yes".into()
            ]))
        );
        assert_eq!(
            read("{}"),
            Ok(Some(["-".into(), "-".into(), "-".into(), "-".into()]))
        );
    }

    #[test]
    fn a_repeated_key_counts_by_its_last_value() {
        let got = read(r#"{"model":"a","model":"b","messages":[1],"messages":[]}"#);
        assert_eq!(
            got,
            Ok(Some([
                "str b".into(),
                "array empty=true".into(),
                "-".into(),
                "-".into()
            ]))
        );
    }

    #[test]
    fn n_is_a_whole_number_from_1_to_128() {
        let body = |n: &str| {
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"q"}}],"n":{n}}}"#)
        };
        for n in ["1", "128", "null"] {
            assert!(chat(body(n).as_bytes(), false).is_ok(), "n={n}");
        }
        for n in [
            "0",
            "129",
            "1700000000",
            "18446744073709551615",
            "-1",
            "2.5",
            "\"2\"",
        ] {
            let err = chat(body(n).as_bytes(), false).unwrap_err();
            assert!(err.to_string().contains("`n`"), "n={n}: {err}");
        }
    }

    #[test]
    fn json_that_is_not_an_object_and_json_that_is_not_json() {
        for json in ["[1,[2]]", "\"x\"", "3", "-3", "0.5", "true", "null"] {
            assert_eq!(read(json), Ok(None), "{json}");
        }
        for json in ["{not json", "{\"model\":\"a\"} trailing", "[1,", ""] {
            assert!(read(json).is_err(), "{json}");
        }
    }

    // Quick properties inside `cargo test`; the coverage-guided targets
    // (cargo-fuzz, time-boxed by scripts/fuzz) are in fuzz/.
    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;
        use serde_json::Value;

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(Value::from),
                ".{0,12}".prop_map(Value::String),
            ];
            leaf.prop_recursive(6, 64, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    proptest::collection::btree_map(
                        prop_oneof![
                            Just("model".to_owned()),
                            Just("messages".to_owned()),
                            Just("stream".to_owned()),
                            Just("max_tokens".to_owned()),
                            "[a-z\\[\\]{}\"]{0,6}",
                        ],
                        inner,
                        0..6
                    )
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn depth(v: &Value) -> usize {
            match v {
                Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
                Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
                _ => 0,
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn validation_never_panics_on_bytes(input in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = check_structure(&input, 8);
                let _ = chat(&input, true);
                let _ = chat(&input, false);
            }

            #[test]
            fn the_depth_check_agrees_with_a_parser(value in json_value()) {
                let text = serde_json::to_vec(&value).unwrap();
                let d = depth(&value);
                prop_assert!(check_structure(&text, d).is_ok());
                if d > 0 {
                    prop_assert!(check_structure(&text, d - 1).is_err());
                }
                let _ = chat(&text, true);
            }
        }
    }
}
