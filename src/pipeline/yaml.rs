//! A YAML reader that keeps the line and column of every node, so that any error in a pipeline
//! file can point at its source. Values follow the YAML 1.2 core schema.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Aliases may repeat a subtree; past this many nodes in all the file is refused, which stops
/// "billion laughs" alias bombs long before they cost memory.
const MAX_NODES: usize = 100_000;
/// The same for the text in the expanded document: a few aliases of one long anchored string
/// cost as much memory as a million nodes. Real pipeline files are a few kilobytes.
const MAX_BYTES: usize = 16 << 20;

/// Where a node starts in its file (1-based line and column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mark {
    pub line: usize,
    pub col: usize,
}

impl From<Marker> for Mark {
    fn from(marker: Marker) -> Self {
        Mark {
            line: marker.line(),
            col: marker.col() + 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Keys in file order, each with the mark of the key itself.
    Map(Vec<(String, Mark, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub mark: Mark,
    /// Nodes in this subtree, itself included (for the alias budget).
    size: usize,
    /// Bytes of text (scalars and keys) in this subtree (for the alias budget).
    bytes: usize,
}

impl Node {
    pub fn new(value: Value, mark: Mark) -> Self {
        let (size, bytes) = match &value {
            Value::Seq(items) => items
                .iter()
                .fold((1, 0), |(size, bytes), n| (size + n.size, bytes + n.bytes)),
            Value::Map(entries) => entries.iter().fold((1, 0), |(size, bytes), (k, _, n)| {
                (size + n.size, bytes + k.len() + n.bytes)
            }),
            Value::Str(s) => (1, s.len()),
            _ => (1, 8),
        };
        Node {
            value,
            mark,
            size,
            bytes,
        }
    }

    /// What kind of value this is, for error messages ("a mapping", "a string").
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// A syntax problem, with the position the parser stopped at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub mark: Mark,
    pub message: String,
}

/// Parses one YAML document. An empty file is `Null`.
pub fn parse(source: &str) -> Result<Node, SyntaxError> {
    let mut parser = Parser::new_from_str(source);
    let mut builder = Builder::default();
    loop {
        let (event, marker) = parser.next_token().map_err(|err| SyntaxError {
            mark: (*err.marker()).into(),
            message: err.info().to_string(),
        })?;
        let mark = Mark::from(marker);
        match event {
            Event::StreamEnd => break,
            Event::DocumentStart if builder.document_done() => {
                return Err(SyntaxError {
                    mark,
                    message: "a pipeline file holds one YAML document; found a second `---`".into(),
                });
            }
            other => builder.push(other, mark)?,
        }
    }
    Ok(builder.finish())
}

/// Turns the parser's event stream into a tree of [`Node`]s.
#[derive(Default)]
struct Builder {
    /// Open collections: the collection under construction, its anchor id and mark, and for a
    /// mapping the key that waits for its value.
    open: Vec<Open>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    nodes: usize,
    /// Bytes of text the expanded document holds so far: each alias counts its copy.
    bytes: usize,
}

enum Open {
    Seq {
        items: Vec<Node>,
        anchor: usize,
        mark: Mark,
    },
    Map {
        entries: Vec<(String, Mark, Node)>,
        pending_key: Option<(String, Mark)>,
        /// Keys that came in through a merge key (`<<: *base`): an explicit key replaces them.
        merged: Vec<String>,
        anchor: usize,
        mark: Mark,
    },
}

impl Builder {
    fn document_done(&self) -> bool {
        self.root.is_some()
    }

    fn push(&mut self, event: Event, mark: Mark) -> Result<(), SyntaxError> {
        match event {
            Event::Scalar(text, style, anchor, tag) => {
                // Counted here, once: an alias to it counts its copy in the Alias arm.
                self.bytes += text.len();
                let explicit_string = tag.is_some_and(|t| t.suffix == "str");
                let value = if style == TScalarStyle::Plain && !explicit_string {
                    resolve_plain(&text)
                } else {
                    Value::Str(text)
                };
                self.complete(Node::new(value, mark), anchor)
            }
            Event::SequenceStart(anchor, _) => {
                self.open.push(Open::Seq {
                    items: Vec::new(),
                    anchor,
                    mark,
                });
                Ok(())
            }
            Event::MappingStart(anchor, _) => {
                self.open.push(Open::Map {
                    entries: Vec::new(),
                    pending_key: None,
                    merged: Vec::new(),
                    anchor,
                    mark,
                });
                Ok(())
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.open.pop() {
                    Some(Open::Seq {
                        items,
                        anchor,
                        mark,
                    }) => (Node::new(Value::Seq(items), mark), anchor),
                    Some(Open::Map {
                        entries,
                        anchor,
                        mark,
                        ..
                    }) => (Node::new(Value::Map(entries), mark), anchor),
                    None => return Ok(()),
                };
                self.complete(node, anchor)
            }
            Event::Alias(id) => {
                let node = self.anchors.get(&id).cloned().ok_or_else(|| SyntaxError {
                    mark,
                    message: "an alias to an unknown anchor".into(),
                })?;
                // The copy counts in full: that is what makes an alias bomb expensive.
                self.nodes += node.size - 1;
                self.bytes += node.bytes;
                self.check_text_budget(mark)?;
                self.complete(node, 0)
            }
            Event::StreamStart
            | Event::DocumentStart
            | Event::DocumentEnd
            | Event::StreamEnd
            | Event::Nothing => Ok(()),
        }
    }

    /// Files a finished node into its parent (or as the document root).
    fn complete(&mut self, node: Node, anchor: usize) -> Result<(), SyntaxError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(SyntaxError {
                mark: node.mark,
                message: format!(
                    "the document expands to more than {MAX_NODES} values (an alias bomb?); refusing it"
                ),
            });
        }
        self.check_text_budget(node.mark)?;
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.open.last_mut() {
            None => self.root = Some(node),
            Some(Open::Seq { items, .. }) => items.push(node),
            Some(Open::Map {
                entries,
                pending_key,
                merged,
                ..
            }) => match pending_key.take() {
                Some((key, key_mark)) if key == MERGE_KEY => {
                    merge_into(entries, merged, node, key_mark)?;
                }
                Some((key, key_mark)) => {
                    if let Some(at) = entries.iter().position(|(k, _, _)| *k == key) {
                        let Some(m) = merged.iter().position(|k| *k == key) else {
                            return Err(SyntaxError {
                                mark: key_mark,
                                message: format!("duplicate key `{key}`"),
                            });
                        };
                        merged.swap_remove(m);
                        entries.remove(at);
                    }
                    entries.push((key, key_mark, node));
                }
                None => {
                    let mark = node.mark;
                    *pending_key = Some((mapping_key(node)?, mark));
                }
            },
        }
        Ok(())
    }

    fn check_text_budget(&self, mark: Mark) -> Result<(), SyntaxError> {
        if self.bytes <= MAX_BYTES {
            return Ok(());
        }
        Err(SyntaxError {
            mark,
            message: format!(
                "the document expands to more than {} MiB of text (an alias bomb?); refusing it",
                MAX_BYTES >> 20
            ),
        })
    }

    fn finish(self) -> Node {
        self.root
            .unwrap_or_else(|| Node::new(Value::Null, Mark { line: 1, col: 1 }))
    }
}

/// YAML's merge key: `<<: *base` (or `<<: [*a, *b]`) takes the keys of the mappings named
/// that this mapping does not set itself, as CI files use it to share settings.
const MERGE_KEY: &str = "<<";

/// A scalar as a mapping key.
fn mapping_key(node: Node) -> Result<String, SyntaxError> {
    Ok(match node.value {
        Value::Str(s) => s,
        Value::Int(i) => i.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Null => "null".into(),
        Value::Seq(_) | Value::Map(_) => {
            return Err(SyntaxError {
                mark: node.mark,
                message: "mapping keys must be plain values, not lists or mappings".into(),
            });
        }
    })
}

/// Adds the keys of the merged mapping(s) in `value` that `entries` lacks; with a list, an
/// earlier mapping's key wins over a later one's.
fn merge_into(
    entries: &mut Vec<(String, Mark, Node)>,
    merged: &mut Vec<String>,
    value: Node,
    mark: Mark,
) -> Result<(), SyntaxError> {
    let sources = match value.value {
        Value::Map(map) => vec![map],
        Value::Seq(items) => items
            .into_iter()
            .map(|item| match item.value {
                Value::Map(map) => Ok(map),
                _ => Err(item.mark),
            })
            .collect::<Result<_, _>>()
            .map_err(|mark| SyntaxError {
                mark,
                message: format!("`{MERGE_KEY}` takes a mapping or a list of mappings"),
            })?,
        _ => {
            return Err(SyntaxError {
                mark,
                message: format!("`{MERGE_KEY}` takes a mapping or a list of mappings"),
            });
        }
    };
    for (key, key_mark, node) in sources.into_iter().flatten() {
        if !entries.iter().any(|(k, _, _)| *k == key) {
            merged.push(key.clone());
            entries.push((key, key_mark, node));
        }
    }
    Ok(())
}

/// The YAML 1.2 core schema for plain (unquoted) scalars.
pub fn resolve_plain(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Value::Float(f64::INFINITY);
        }
        "-.inf" | "-.Inf" | "-.INF" => return Value::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Value::Float(f64::NAN),
        _ => {}
    }
    if let Some(int) = parse_int(text) {
        return Value::Int(int);
    }
    let looks_numeric = text
        .trim_start_matches(['+', '-'])
        .starts_with(|c: char| c.is_ascii_digit() || c == '.');
    if looks_numeric
        && text
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
        && let Ok(float) = text.parse::<f64>()
    {
        return Value::Float(float);
    }
    Value::Str(text.to_string())
}

fn parse_int(text: &str) -> Option<i64> {
    if let Some(hex) = text.strip_prefix("0x") {
        return i64::from_str_radix(hex, 16).ok();
    }
    if let Some(oct) = text.strip_prefix("0o") {
        return i64::from_str_radix(oct, 8).ok();
    }
    let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_get<'a>(node: &'a Node, key: &str) -> &'a Node {
        match &node.value {
            Value::Map(entries) => &entries.iter().find(|(k, _, _)| k == key).unwrap().2,
            other => panic!("not a map: {other:?}"),
        }
    }

    #[test]
    fn scalars_follow_the_core_schema() {
        let doc =
            parse("a: 1\nb: 2.5e-5\nc: true\nd: ~\ne: '1'\nf: hello\ng: -3\nh: 1.0\n").unwrap();
        assert_eq!(map_get(&doc, "a").value, Value::Int(1));
        assert_eq!(map_get(&doc, "b").value, Value::Float(2.5e-5));
        assert_eq!(map_get(&doc, "c").value, Value::Bool(true));
        assert_eq!(map_get(&doc, "d").value, Value::Null);
        assert_eq!(map_get(&doc, "e").value, Value::Str("1".into()));
        assert_eq!(map_get(&doc, "f").value, Value::Str("hello".into()));
        assert_eq!(map_get(&doc, "g").value, Value::Int(-3));
        assert_eq!(map_get(&doc, "h").value, Value::Float(1.0));
    }

    #[test]
    fn marks_are_one_based_lines_and_columns() {
        let doc = parse("top:\n  inner: 5\n").unwrap();
        let top = map_get(&doc, "top");
        let Value::Map(entries) = &top.value else {
            panic!()
        };
        assert_eq!(entries[0].1, Mark { line: 2, col: 3 });
        assert_eq!(entries[0].2.mark, Mark { line: 2, col: 10 });
    }

    #[test]
    fn aliases_copy_their_anchor() {
        let doc = parse("a: &x {k: 1}\nb: *x\n").unwrap();
        assert_eq!(map_get(&doc, "a").value, map_get(&doc, "b").value);
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for level in 1..10 {
            let prev = (b'a' + level - 1) as char;
            let name = (b'a' + level) as char;
            bomb.push_str(&format!("{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
        }
        let err = parse(&bomb).unwrap_err();
        assert!(err.message.contains("alias bomb"), "{err:?}");
    }

    #[test]
    fn duplicate_keys_and_syntax_errors_have_positions() {
        let err = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(err.mark.line, 2);
        assert!(err.message.contains("duplicate key `a`"));
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.mark.line >= 1);
    }
}
