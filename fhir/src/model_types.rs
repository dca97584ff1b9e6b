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

/// The element `key` of type `ty`, through one open-addressing hash table
/// over every (type, key) of the model, built on first use. Property lookup is
/// the validator's most frequent operation.
#[inline]
pub fn lookup(ty: TypeId, key: &[u8]) -> Option<&'static Elem> {
    static TABLE: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(build_table);
    let mask = table.len() - 1;
    let mut i = hash(ty, key) & mask;
    loop {
        let entry = table[i];
        if entry == u32::MAX {
            return None;
        }
        let (t, e) = ((entry >> 16) as TypeId, (entry & 0xFFFF) as usize);
        if t == ty {
            let elem = &crate::model::TYPES[t as usize].elems[e];
            if elem.key.as_bytes() == key {
                return Some(elem);
            }
        }
        i = (i + 1) & mask;
    }
}

fn build_table() -> Vec<u32> {
    let types = &crate::model::TYPES;
    let n: usize = types.iter().map(|t| t.elems.len()).sum();
    let size = (n * 4).next_power_of_two();
    let mut table = vec![u32::MAX; size];
    for (t, def) in types.iter().enumerate() {
        for (e, elem) in def.elems.iter().enumerate() {
            let mut i = hash(t as TypeId, elem.key.as_bytes()) & (size - 1);
            while table[i] != u32::MAX {
                i = (i + 1) & (size - 1);
            }
            table[i] = ((t as u32) << 16) | e as u32;
        }
    }
    table
}

#[inline]
fn hash(ty: TypeId, key: &[u8]) -> usize {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h = (ty as u64).wrapping_mul(K) ^ key.len() as u64;
    let mut chunks = key.chunks_exact(8);
    for c in &mut chunks {
        h = (h.rotate_left(5) ^ u64::from_le_bytes(c.try_into().unwrap())).wrapping_mul(K);
    }
    let mut last = 0u64;
    for (i, b) in chunks.remainder().iter().enumerate() {
        last |= (*b as u64) << (8 * i);
    }
    h = (h.rotate_left(5) ^ last).wrapping_mul(K);
    (h ^ (h >> 29)) as usize
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
