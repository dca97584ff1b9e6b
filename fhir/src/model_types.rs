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
    /// Whether the validator keeps the value for a check of the object.
    pub keep: Keep,
}

/// Values the validator keeps while walking an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    No,
    /// `id` of a resource (HealthLake needs one at the top; contained ids
    /// resolve `#id` references).
    Id,
    /// `Reference.reference`.
    Reference,
    /// `Coding.system` and `Coding.code`, under a required binding.
    System,
    Code,
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
#[inline(always)]
pub fn lookup(ty: TypeId, key: &[u8]) -> Option<&'static Elem> {
    static TABLE: std::sync::OnceLock<Vec<(u64, u32)>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(build_table);
    let mask = table.len() - 1;
    let h = hash(ty, key);
    let mut i = h as usize & mask;
    loop {
        let (eh, entry) = table[i];
        if entry == u32::MAX {
            return None;
        }
        if eh == h {
            let (t, e) = ((entry >> 16) as TypeId, (entry & 0xFFFF) as usize);
            let elem = &crate::model::TYPES[t as usize].elems[e];
            if t == ty && eq_small(elem.key.as_bytes(), key) {
                return Some(elem);
            }
        }
        i = (i + 1) & mask;
    }
}

fn build_table() -> Vec<(u64, u32)> {
    let types = &crate::model::TYPES;
    let n: usize = types.iter().map(|t| t.elems.len()).sum();
    let size = (n * 4).next_power_of_two();
    let mut table = vec![(0u64, u32::MAX); size];
    for (t, def) in types.iter().enumerate() {
        for (e, elem) in def.elems.iter().enumerate() {
            let h = hash(t as TypeId, elem.key.as_bytes());
            let mut i = h as usize & (size - 1);
            while table[i].1 != u32::MAX {
                i = (i + 1) & (size - 1);
            }
            table[i] = (h, ((t as u32) << 16) | e as u32);
        }
    }
    table
}

/// The type id of the resource type named `name`, through a hash table
/// built on first use (references and `resourceType` are looked up often).
#[inline]
pub fn resource_type_id(name: &[u8]) -> Option<TypeId> {
    static TABLE: std::sync::OnceLock<Vec<(u64, u16)>> = std::sync::OnceLock::new();
    const NONE: u16 = u16::MAX;
    let table = TABLE.get_or_init(|| {
        let names = &crate::model::RESOURCE_TYPES;
        let size = (names.len() * 4).next_power_of_two();
        let mut table = vec![(0u64, NONE); size];
        for (i, n) in names.iter().enumerate() {
            let h = hash(TypeId::MAX, n.as_bytes());
            let mut j = h as usize & (size - 1);
            while table[j].1 != NONE {
                j = (j + 1) & (size - 1);
            }
            table[j] = (h, i as u16);
        }
        table
    });
    let mask = table.len() - 1;
    let h = hash(TypeId::MAX, name);
    let mut j = h as usize & mask;
    loop {
        let (eh, i) = table[j];
        if i == NONE {
            return None;
        }
        if eh == h && eq_small(crate::model::RESOURCE_TYPES[i as usize].as_bytes(), name) {
            return Some(crate::model::RESOURCE_TYPE_IDS[i as usize]);
        }
        j = (j + 1) & mask;
    }
}

/// `a == b` for short byte strings, with a few loads instead of a call to
/// memcmp (element names are short).
#[inline]
fn eq_small(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let u64_at = |s: &[u8], i: usize| u64::from_le_bytes(s[i..i + 8].try_into().unwrap());
    let u32_at = |s: &[u8], i: usize| u32::from_le_bytes(s[i..i + 4].try_into().unwrap());
    match n {
        0 => true,
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=7 => u32_at(a, 0) == u32_at(b, 0) && u32_at(a, n - 4) == u32_at(b, n - 4),
        8..=16 => u64_at(a, 0) == u64_at(b, 0) && u64_at(a, n - 8) == u64_at(b, n - 8),
        _ => a == b,
    }
}

/// A hash of (type, key) from at most four loads: the first and last eight
/// (or four) bytes of the key, overlapping when it is short, as small-key
/// hashes do. Every element name of FHIR R4 is shorter than 64 bytes.
#[inline]
fn hash(ty: TypeId, key: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let n = key.len();
    let u64_at = |i: usize| u64::from_le_bytes(key[i..i + 8].try_into().unwrap());
    let u32_at = |i: usize| u32::from_le_bytes(key[i..i + 4].try_into().unwrap()) as u64;
    let (a, b) = if n >= 16 {
        (
            u64_at(0) ^ u64_at(8).rotate_left(17),
            u64_at(n - 8) ^ u64_at(n / 2 - 4).rotate_left(31),
        )
    } else if n >= 8 {
        (u64_at(0), u64_at(n - 8))
    } else if n >= 4 {
        (u32_at(0), u32_at(n - 4))
    } else if n > 0 {
        (
            key[0] as u64 | (key[n / 2] as u64) << 8 | (key[n - 1] as u64) << 16,
            0,
        )
    } else {
        (0, 0)
    };
    let m = (a ^ K).wrapping_mul(b ^ (ty as u64) << 32 ^ n as u64 ^ K.rotate_left(23));
    let m = m ^ (m >> 32) ^ a.rotate_left(7);
    m.wrapping_mul(K) ^ (m >> 29)
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
