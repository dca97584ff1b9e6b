//! A resource's JSON text as a tree FHIRPath can walk: one flat vector of
//! nodes over the text (children linked by index), built in one pass of
//! the crate's JSON [`Cursor`]. Strings and numbers stay spans of the text:
//! nothing is copied unless a string has escapes, and a decimal keeps the
//! digits it was written with (its precision).

use std::borrow::Cow;

use crate::json::{Cursor, JsonError, Kind, Span};

/// Index of a node in its [`Doc`].
pub type NodeId = u32;

const NONE: NodeId = NodeId::MAX;

#[derive(Debug, Clone, Copy)]
struct Node {
    value: Span,
    /// The member name's span (quotes included) for members of an object.
    key: Option<Span>,
    first_child: NodeId,
    next_sibling: NodeId,
}

/// A parsed JSON text.
#[derive(Debug)]
pub struct Doc<'a> {
    src: &'a str,
    nodes: Vec<Node>,
}

/// Resources nest far less than this; deeper text is refused, not walked.
pub const MAX_DEPTH: usize = 512;

impl<'a> Doc<'a> {
    /// Parses `src`, which must be one JSON value (checked strictly).
    pub fn parse(src: &'a str) -> Result<Doc<'a>, JsonError> {
        let mut doc = Doc {
            src,
            nodes: Vec::with_capacity(src.len() / 16),
        };
        let mut c = Cursor::new(src, MAX_DEPTH);
        doc.build(&mut c, None)?;
        c.finish()?;
        Ok(doc)
    }

    pub fn src(&self) -> &'a str {
        self.src
    }

    pub fn root(&self) -> NodeId {
        0
    }

    fn build(&mut self, c: &mut Cursor<'a>, key: Option<Span>) -> Result<NodeId, JsonError> {
        let kind = c.peek_kind();
        let id = self.nodes.len() as NodeId;
        let start = c.pos();
        match kind {
            Some(kind @ (Kind::Object | Kind::Array)) => {
                self.nodes.push(Node {
                    value: Span {
                        kind,
                        start,
                        end: start,
                        escaped: false,
                    },
                    key,
                    first_child: NONE,
                    next_sibling: NONE,
                });
                c.enter()?;
                let mut last = NONE;
                let mut first = true;
                loop {
                    let key = if kind == Kind::Object {
                        match c.next_key(first)? {
                            Some(k) => Some(k),
                            None => break,
                        }
                    } else {
                        if !c.next_item(first)? {
                            break;
                        }
                        None
                    };
                    first = false;
                    let child = self.build(c, key)?;
                    if last == NONE {
                        self.nodes[id as usize].first_child = child;
                    } else {
                        self.nodes[last as usize].next_sibling = child;
                    }
                    last = child;
                }
                self.nodes[id as usize].value.end = c.pos();
            }
            _ => {
                let value = c.value()?;
                self.nodes.push(Node {
                    value,
                    key,
                    first_child: NONE,
                    next_sibling: NONE,
                });
            }
        }
        Ok(id)
    }

    pub fn kind(&self, id: NodeId) -> Kind {
        self.nodes[id as usize].value.kind
    }

    /// The node's text as written (a whole object for an object).
    pub fn text(&self, id: NodeId) -> &'a str {
        self.nodes[id as usize].value.text(self.src)
    }

    /// The byte offset where the node's value starts.
    pub fn offset(&self, id: NodeId) -> usize {
        self.nodes[id as usize].value.start
    }

    /// A string node's decoded value.
    pub fn str(&self, id: NodeId) -> Option<Cow<'a, str>> {
        self.nodes[id as usize].value.decoded(self.src)
    }

    /// The member name of a node inside an object.
    pub fn key(&self, id: NodeId) -> Option<Cow<'a, str>> {
        self.nodes[id as usize]
            .key
            .and_then(|k| k.decoded(self.src))
    }

    /// Whether the node is a member named `name`.
    pub fn key_is(&self, id: NodeId, name: &str) -> bool {
        self.nodes[id as usize]
            .key
            .is_some_and(|k| k.str_eq(self.src, name))
    }

    /// The children of an object (its members) or array (its items).
    pub fn children(&self, id: NodeId) -> Children<'_, 'a> {
        Children {
            doc: self,
            next: self.nodes[id as usize].first_child,
        }
    }

    /// The member `name` of an object.
    pub fn member(&self, id: NodeId, name: &str) -> Option<NodeId> {
        if self.kind(id) != Kind::Object {
            return None;
        }
        self.children(id).find(|&c| self.key_is(c, name))
    }

    /// The string member `name` of an object, decoded.
    pub fn member_str(&self, id: NodeId, name: &str) -> Option<Cow<'a, str>> {
        self.member(id, name).and_then(|m| self.str(m))
    }
}

pub struct Children<'d, 'a> {
    doc: &'d Doc<'a>,
    next: NodeId,
}

impl Iterator for Children<'_, '_> {
    type Item = NodeId;

    fn next(&mut self) -> Option<NodeId> {
        if self.next == NONE {
            return None;
        }
        let id = self.next;
        self.next = self.doc.nodes[id as usize].next_sibling;
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_over_the_text() {
        let src = r#" {"a": [1, 2.50, {"b\u0031": "x\"y"}], "c": null, "d": {}} "#;
        let doc = Doc::parse(src).unwrap();
        let root = doc.root();
        let keys: Vec<_> = doc.children(root).map(|c| doc.key(c).unwrap()).collect();
        assert_eq!(keys, ["a", "c", "d"]);
        let a = doc.member(root, "a").unwrap();
        let items: Vec<_> = doc.children(a).collect();
        assert_eq!(doc.text(items[1]), "2.50");
        let inner = doc.member(items[2], "b1").unwrap();
        assert_eq!(doc.str(inner).unwrap(), "x\"y");
        assert_eq!(doc.kind(doc.member(root, "c").unwrap()), Kind::Null);
        assert_eq!(doc.children(doc.member(root, "d").unwrap()).count(), 0);
        assert_eq!(doc.text(root), &src[1..src.len() - 1]);
        assert!(Doc::parse(r#"{"a": }"#).is_err());
        assert!(Doc::parse(r#"{"a": 1} x"#).is_err());
    }
}
