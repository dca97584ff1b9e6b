//! FHIR R4 facts the engine needs before validation: the resource types and
//! HealthLake's id pattern.

mod resource_types;

pub use resource_types::RESOURCE_TYPES;

/// The canonical `&'static str` of a resource type name, if it is one.
pub fn resource_type(name: &str) -> Option<&'static str> {
    RESOURCE_TYPES
        .binary_search(&name)
        .ok()
        .map(|i| RESOURCE_TYPES[i])
}

/// HealthLake's resource id pattern `[A-Za-z0-9\-\.]{1,64}`.
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.')
}

#[cfg(test)]
mod tests {
    #[test]
    fn knows_resource_types_and_ids() {
        assert_eq!(super::RESOURCE_TYPES.len(), 146);
        assert!(super::RESOURCE_TYPES.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(super::resource_type("Observation"), Some("Observation"));
        assert_eq!(super::resource_type("DomainResource"), None);
        assert!(super::is_valid_id("a-1.B"));
        assert!(!super::is_valid_id("a_1"));
        assert!(!super::is_valid_id(&"a".repeat(65)));
    }
}
