//! FHIRPath (<http://hl7.org/fhirpath/N1/>) over a resource's JSON text: the
//! part SQL-on-FHIR v2 ViewDefinitions use (path navigation with choice
//! types, `where`, `exists`, `empty`, `first`, `ofType`, `extension(url)`,
//! `join`, `getResourceKey()`, `getReferenceKey()`, the boundary functions,
//! boolean logic, comparison and arithmetic, indexers, literals and
//! `%constants`), plus the common functions invariants use (`all`,
//! `select`, `repeat`, `count`, `iif`, string functions).
//!
//! * [`parse`]: text to an [`Expr`] tree, errors with byte offsets;
//! * [`doc`]: the JSON text as a flat tree of spans (no copies);
//! * [`eval`]: evaluation, typed by the generated model ([`crate::model`]),
//!   so that choice elements and `ofType` follow the definitions;
//! * [`temporal`]: comparison and boundaries of partial dates and times.
//!
//! It lives beside the validator so that FHIRPath invariants (`ele-1` and
//! the resources' constraints) can use it next.

pub mod doc;
pub mod eval;
pub mod parse;
pub mod temporal;

pub use doc::{Doc, NodeId};
pub use eval::{Collection, EvalError, Evaluator, Value, Vars};
pub use parse::{parse, Expr, ExprKind, ParseError};

#[cfg(test)]
mod tests {
    use super::*;

    fn eval_texts(resource: &str, path: &str) -> Vec<String> {
        let doc = Doc::parse(resource).unwrap();
        let ev = Evaluator::new(&doc, &());
        let e = parse(path).unwrap();
        let out = ev.eval(&e, &[ev.root()]).unwrap();
        out.iter()
            .map(|v| {
                ev.to_text(v).unwrap_or_else(|| match v {
                    Value::Node(n, _) => doc.text(*n).to_string(),
                    _ => unreachable!(),
                })
            })
            .collect()
    }

    #[test]
    fn paths_over_a_resource() {
        let obs = r#"{"resourceType":"Observation","id":"o1","status":"final",
            "code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},
            "valueQuantity":{"value":72.50,"unit":"/min"},
            "component":[{"code":{"text":"a"},"valueString":"x"},{"code":{"text":"b"},"valueInteger":3}],
            "extension":[{"url":"u1","valueCode":"M"},{"url":"u2","valueBoolean":true}]}"#;
        let cases: &[(&str, &[&str])] = &[
            ("id", &["o1"]),
            ("Observation.id", &["o1"]),
            ("value.ofType(Quantity).value", &["72.50"]),
            ("value.ofType(string)", &[]),
            ("component.value.ofType(string)", &["x"]),
            ("component.value.ofType(integer) + 1", &["4"]),
            (
                "component.where(value.ofType(integer) > 2).code.text",
                &["b"],
            ),
            ("component.code.text.join('|')", &["a|b"]),
            (
                "code.coding.where(system = 'http://loinc.org').code.first()",
                &["8867-4"],
            ),
            ("extension('u1').value.ofType(code)", &["M"]),
            ("extension('u2').value.ofType(boolean)", &["true"]),
            ("component[1].code.text", &["b"]),
            ("component.exists() and status = 'final'", &["true"]),
            ("component.empty()", &["false"]),
            ("status = 'final' implies id = 'x'", &["false"]),
            ("value.ofType(Quantity).value.lowBoundary()", &["72.495"]),
            ("component.count()", &["2"]),
            ("(1 | 2 | 1).count()", &["2"]),
            ("getResourceKey()", &["o1"]),
            ("'a' & {} & 'b'", &["ab"]),
            ("7 div 2 = 3 and 7 mod 2 = 1", &["true"]),
            ("status in ('final' | 'amended')", &["true"]),
        ];
        for (path, want) in cases {
            assert_eq!(eval_texts(obs, path), *want, "{path}");
        }
    }

    #[test]
    fn references_and_contained_resources() {
        let p = r#"{"resourceType":"Patient","id":"p1",
            "link":[{"other":{"reference":"Patient/p2"}},{"other":{"reference":"http://x/fhir/RelatedPerson/r1/_history/3"}}],
            "contained":[{"resourceType":"Organization","id":"org","name":"Acme"}]}"#;
        assert_eq!(eval_texts(p, "link.other.getReferenceKey()"), ["p2", "r1"]);
        assert_eq!(eval_texts(p, "link.other.getReferenceKey(Patient)"), ["p2"]);
        assert_eq!(
            eval_texts(p, "contained.ofType(Organization).name"),
            ["Acme"]
        );
        assert_eq!(
            eval_texts(p, "contained.ofType(Patient).name"),
            Vec::<String>::new()
        );
    }
}
