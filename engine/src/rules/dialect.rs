//! The SQL dialect of rules and `fhirflow sql`: DuckDB's syntax (so that a
//! rule can write `SELECT * REPLACE (… AS resource)` or `* EXCLUDE (…)`),
//! without its lambdas, so that `resource->'name'->>'family'` is the JSON
//! operator of datafusion-functions-json and not a lambda over `resource`.

use datafusion::common::{plan_err, Result};
use datafusion::execution::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::parser::{DFParserBuilder, Statement};
use datafusion::sql::sqlparser::dialect::{Dialect, DuckDbDialect};

#[derive(Debug, Default)]
pub struct RuleDialect(DuckDbDialect);

impl Dialect for RuleDialect {
    fn is_identifier_start(&self, ch: char) -> bool {
        self.0.is_identifier_start(ch)
    }
    fn is_identifier_part(&self, ch: char) -> bool {
        self.0.is_identifier_part(ch)
    }
    fn supports_lambda_functions(&self) -> bool {
        false
    }
    fn supports_select_wildcard_replace(&self) -> bool {
        true
    }
    fn supports_select_wildcard_exclude(&self) -> bool {
        true
    }
    fn supports_trailing_commas(&self) -> bool {
        self.0.supports_trailing_commas()
    }
    fn supports_filter_during_aggregation(&self) -> bool {
        self.0.supports_filter_during_aggregation()
    }
    fn supports_group_by_expr(&self) -> bool {
        self.0.supports_group_by_expr()
    }
    fn supports_named_fn_args_with_eq_operator(&self) -> bool {
        self.0.supports_named_fn_args_with_eq_operator()
    }
    fn supports_named_fn_args_with_assignment_operator(&self) -> bool {
        self.0.supports_named_fn_args_with_assignment_operator()
    }
    fn supports_dictionary_syntax(&self) -> bool {
        self.0.supports_dictionary_syntax()
    }
    fn support_map_literal_syntax(&self) -> bool {
        self.0.support_map_literal_syntax()
    }
    fn allow_extract_single_quotes(&self) -> bool {
        self.0.allow_extract_single_quotes()
    }
    fn supports_array_typedef_with_brackets(&self) -> bool {
        self.0.supports_array_typedef_with_brackets()
    }
    fn supports_order_by_all(&self) -> bool {
        self.0.supports_order_by_all()
    }
    fn supports_notnull_operator(&self) -> bool {
        self.0.supports_notnull_operator()
    }
}

/// Parses exactly one statement in the rule dialect.
pub fn parse(sql: &str) -> Result<Statement> {
    let mut statements = DFParserBuilder::new(sql)
        .with_dialect(&RuleDialect::default())
        .build()?
        .parse_statements()?;
    match (statements.pop_front(), statements.is_empty()) {
        (Some(s), true) => Ok(s),
        (None, _) => plan_err!("no SQL statement"),
        (Some(_), false) => plan_err!("more than one SQL statement; give one"),
    }
}

/// Parses and plans one statement in the rule dialect.
pub async fn plan(state: &SessionState, sql: &str) -> Result<LogicalPlan> {
    state.statement_to_plan(parse(sql)?).await
}
