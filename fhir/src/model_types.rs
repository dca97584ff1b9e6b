//! The shapes of the generated model ([`crate::model`]).

/// Index into [`crate::model::TYPES`].
pub type TypeId = u16;

/// `max` of an element whose maximum cardinality is `*`.
pub const MANY: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A primitive type; its type id is below [`crate::model::ANY_RESOURCE`].
    Prim,
    /// `Resource` as an element type (`contained`, `Bundle.entry.resource`):
    /// the object's `resourceType` says which.
    AnyResource,
    Complex,
    Resource,
    /// A BackboneElement or Element defined inline, named by its path.
    Backbone,
}

/// One element of a type's definition: cardinality is counted per slot; a
/// choice `value[x]` is one slot with one [`Elem`] per allowed type.
#[derive(Debug)]
pub struct Slot {
    /// As in the definition: `status`, `value[x]`.
    pub name: &'static str,
    pub min: u32,
    pub max: u32,
    pub choice: bool,
}

/// A JSON property name a type accepts.
#[derive(Debug)]
pub struct Elem {
    pub key: &'static str,
    pub slot: u8,
    pub ty: TypeId,
    /// 1 + index into [`crate::model::VALUE_SETS`] of a required binding; 0: none.
    pub binding: u16,
    /// Index into [`crate::model::TARGETS`] (0: any resource type).
    pub targets: u16,
    /// maxLength of the definition; 0: none.
    pub max_len: u32,
}

#[derive(Debug)]
pub struct TypeDef {
    pub name: &'static str,
    pub kind: Kind,
    pub slots: &'static [Slot],
    /// Sorted by key (byte order).
    pub elems: &'static [Elem],
    /// Slots whose minimum is at least 1.
    pub required: &'static [u8],
}

impl TypeDef {
    pub fn elem(&self, key: &[u8]) -> Option<&'static Elem> {
        let elems: &'static [Elem] = self.elems;
        elems
            .binary_search_by(|e| e.key.as_bytes().cmp(key))
            .ok()
            .map(|i| &elems[i])
    }
}

/// The codes of a value set, per code system, each list sorted.
#[derive(Debug)]
pub struct ValueSet {
    pub url: &'static str,
    pub systems: &'static [(&'static str, &'static [&'static str])],
}

impl ValueSet {
    /// Whether `code` is in the set, from any system.
    pub fn has_code(&self, code: &str) -> bool {
        self.systems
            .iter()
            .any(|(_, codes)| codes.binary_search(&code).is_ok())
    }

    /// Whether (`system`, `code`) is in the set.
    pub fn has(&self, system: &str, code: &str) -> bool {
        self.systems
            .iter()
            .any(|(s, codes)| *s == system && codes.binary_search(&code).is_ok())
    }
}
