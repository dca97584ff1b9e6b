//! The JSON scanner of fhirflow, from [`fhirflow_fhir::json`]: the one strict
//! JSON grammar of the codebase, shared with the validator (which walks the
//! same lexer, and in curation yields step 1's spans in its one pass).
//! Re-exported here because the UDFs and the tenant labeller are its main
//! readers.

pub use fhirflow_fhir::json::*;

#[cfg(test)]
mod tests {
    use super::*;

    /// Escaped strings decode as serde_json decodes them (which the
    /// scanner used before it shared the validator's decoder): a lone
    /// surrogate is no text.
    #[test]
    fn decodes_as_serde_json() {
        for s in [
            r#""a""#,
            r#""\u00e9\n\t\"\\\/\b\f\r""#,
            r#""\ud83d\ude00""#,
            r#""\uD83D\uDE00 and \u65e5本""#,
            r#""\ud83d""#,
            r#""\ude00""#,
            r#""\ud83dx""#,
            r#""\ud83d\n""#,
            r#""\ud83d\u0041""#,
            r#""\ud83d\ud83d\ude00""#,
            r#""x\u0000y""#,
        ] {
            let span = validate(s, 8).unwrap();
            assert_eq!(
                span.decoded(s).map(|c| c.into_owned()),
                serde_json::from_str::<String>(s).ok(),
                "{s}"
            );
        }
    }
}
