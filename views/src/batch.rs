//! A view's rows as Arrow record batches, typed as the specification's
//! default type mappings say (ViewDefinition notes, "Type Hinting with
//! Tags"): `boolean` BOOLEAN, `integer`/`positiveInt`/`unsignedInt` INT,
//! `integer64` BIGINT, `instant` TIMESTAMP WITH TIME ZONE, and every other
//! primitive CHARACTER VARYING in its FHIR string form (a decimal keeps its
//! digits, a date its precision); complex values as their JSON text;
//! `collection: true` columns as lists. An `ansi/type` tag overrides the
//! type (`DATE`, `DECIMAL(10,2)`, `DOUBLE`, ...); a value that does not
//! convert fails the batch rather than turning into a null.

use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, Int64Builder, ListBuilder, StringBuilder,
};
use arrow::compute::{cast_with_options, CastOptions};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

use crate::check::ColumnKind;
use crate::definition::View;
use crate::run::Cell;

/// The type the builders make for a kind (decimals as their text).
fn data_type(kind: ColumnKind) -> DataType {
    match kind {
        ColumnKind::Bool => DataType::Boolean,
        ColumnKind::Int => DataType::Int64,
        ColumnKind::Dec | ColumnKind::Str | ColumnKind::Json => DataType::Utf8,
    }
}

/// The Arrow type of an ISO/IEC 9075 type name, for the types fhirflow writes.
pub fn sql_type(name: &str) -> Option<DataType> {
    let n = name.trim().to_ascii_uppercase();
    let n = n.split_whitespace().collect::<Vec<_>>().join(" ");
    Some(match n.as_str() {
        "BOOLEAN" | "BOOL" => DataType::Boolean,
        "INT" | "INTEGER" => DataType::Int32,
        "BIGINT" => DataType::Int64,
        "SMALLINT" => DataType::Int16,
        "DOUBLE" | "DOUBLE PRECISION" | "FLOAT" => DataType::Float64,
        "REAL" => DataType::Float32,
        "DATE" => DataType::Date32,
        "TIMESTAMP" | "TIMESTAMP WITHOUT TIME ZONE" => {
            DataType::Timestamp(TimeUnit::Microsecond, None)
        }
        "TIMESTAMP WITH TIME ZONE" | "TIMESTAMPTZ" => {
            DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into()))
        }
        "CHARACTER VARYING" | "VARCHAR" | "TEXT" | "STRING" | "CHARACTER" | "CHAR" => {
            DataType::Utf8
        }
        _ => {
            let (base, args) = n.split_once('(')?;
            let args = args.strip_suffix(')')?;
            match base.trim() {
                "DECIMAL" | "NUMERIC" => {
                    let mut it = args.split(',').map(|a| a.trim().parse::<u8>());
                    let p = it.next()?.ok()?;
                    let s = it.next().unwrap_or(Ok(0)).ok()?;
                    if p == 0 || p > 38 || s > p {
                        return None;
                    }
                    DataType::Decimal128(p, s as i8)
                }
                "VARCHAR" | "CHARACTER VARYING" | "CHAR" | "CHARACTER" => DataType::Utf8,
                _ => return None,
            }
        }
    })
}

/// The column's output type: its `ansi/type`, else the default mapping of
/// its FHIR type, else what its kind is built as.
fn output_type(c: &crate::definition::OutputColumn) -> DataType {
    if let Some(t) = c.ansi.as_deref().and_then(sql_type) {
        return t;
    }
    match c.fhir_type.as_deref() {
        Some("integer" | "positiveInt" | "unsignedInt" | "Integer") => DataType::Int32,
        Some("integer64") => DataType::Int64,
        Some("instant") => DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
        _ => data_type(c.kind),
    }
}

/// The Arrow schema of a view's output.
pub fn schema(view: &View) -> SchemaRef {
    let fields: Vec<Field> = view
        .columns
        .iter()
        .map(|c| {
            let t = output_type(c);
            let t = if c.collection {
                DataType::List(Arc::new(Field::new("item", t, true)))
            } else {
                t
            };
            let mut f = Field::new(&c.name, t, true);
            if let Some(d) = &c.description {
                f = f.with_metadata([("description".to_string(), d.clone())].into());
            }
            f
        })
        .collect();
    Arc::new(Schema::new(fields))
}

fn builder(kind: ColumnKind) -> Box<dyn ArrayBuilder> {
    match kind {
        ColumnKind::Bool => Box::new(BooleanBuilder::new()),
        ColumnKind::Int => Box::new(Int64Builder::new()),
        ColumnKind::Dec | ColumnKind::Str | ColumnKind::Json => Box::new(StringBuilder::new()),
    }
}

/// Appends one cell (never a list) to a builder of `kind`.
fn append(b: &mut dyn ArrayBuilder, kind: ColumnKind, cell: &Cell) {
    let any = b.as_any_mut();
    match kind {
        ColumnKind::Bool => {
            let b = any
                .downcast_mut::<BooleanBuilder>()
                .expect("boolean builder");
            match cell {
                Cell::Bool(v) => b.append_value(*v),
                _ => b.append_null(),
            }
        }
        ColumnKind::Int => {
            let b = any.downcast_mut::<Int64Builder>().expect("int builder");
            match cell {
                Cell::Int(v) => b.append_value(*v),
                _ => b.append_null(),
            }
        }
        ColumnKind::Dec => {
            let b = any.downcast_mut::<StringBuilder>().expect("string builder");
            match cell {
                Cell::Dec(v, s) => {
                    b.append_value(fhirflow_fhir::fhirpath::eval::format_decimal(*v, *s))
                }
                Cell::Int(v) => b.append_value(v.to_string()),
                _ => b.append_null(),
            }
        }
        ColumnKind::Str | ColumnKind::Json => {
            let b = any.downcast_mut::<StringBuilder>().expect("string builder");
            match cell {
                Cell::Str(v) => b.append_value(v),
                _ => b.append_null(),
            }
        }
    }
}

enum Col {
    One(Box<dyn ArrayBuilder>, ColumnKind),
    List(ListBuilder<Box<dyn ArrayBuilder>>, ColumnKind),
}

/// Rows in, record batches out.
pub struct BatchBuilder {
    schema: SchemaRef,
    cols: Vec<Col>,
    rows: usize,
}

impl BatchBuilder {
    pub fn new(view: &View) -> BatchBuilder {
        let cols = view
            .columns
            .iter()
            .map(|c| {
                if c.collection {
                    let item = Field::new("item", data_type(c.kind), true);
                    Col::List(
                        ListBuilder::new(builder(c.kind)).with_field(Arc::new(item)),
                        c.kind,
                    )
                } else {
                    Col::One(builder(c.kind), c.kind)
                }
            })
            .collect();
        BatchBuilder {
            schema: schema(view),
            cols,
            rows: 0,
        }
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    pub fn push(&mut self, row: &[Cell]) {
        for (col, cell) in self.cols.iter_mut().zip(row) {
            match col {
                Col::One(b, kind) => append(b.as_mut(), *kind, cell),
                Col::List(b, kind) => match cell {
                    Cell::List(items) => {
                        for item in items {
                            append(b.values().as_mut(), *kind, item);
                        }
                        b.append(true);
                    }
                    _ => b.append(false),
                },
            }
        }
        self.rows += 1;
    }

    /// The rows pushed since the last call, as one batch. A value that does
    /// not convert to its column's type is an error naming the column.
    pub fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        let strict = CastOptions {
            safe: false,
            ..Default::default()
        };
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.cols.len());
        for (c, field) in self.cols.iter_mut().zip(self.schema.fields()) {
            let built = match c {
                Col::One(b, _) => b.finish(),
                Col::List(b, _) => Arc::new(b.finish()) as ArrayRef,
            };
            let array = if built.data_type() == field.data_type() {
                built
            } else {
                cast_with_options(&built, field.data_type(), &strict).map_err(|e| {
                    ArrowError::CastError(format!(
                        "column '{}' as {}: {e}",
                        field.name(),
                        field.data_type()
                    ))
                })?
            };
            arrays.push(array);
        }
        self.rows = 0;
        RecordBatch::try_new(self.schema.clone(), arrays)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;
    use arrow::datatypes::{Date32Type, Int32Type, TimestampMicrosecondType};

    fn batch(view: &str, resources: &[&str]) -> Result<RecordBatch, ArrowError> {
        let view = View::parse(view).unwrap();
        let mut b = BatchBuilder::new(&view);
        for r in resources {
            view.rows(r, &mut |row| b.push(&row)).unwrap();
        }
        b.finish()
    }

    #[test]
    fn types_as_the_specification_maps_them_and_as_tags_say() {
        let view = r#"{"resource": "Observation", "select": [{"column": [
            {"name": "v", "path": "value.ofType(Quantity).value"},
            {"name": "d", "path": "value.ofType(Quantity).value", "tag": [{"name": "ansi/type", "value": "DECIMAL(6,2)"}]},
            {"name": "at", "path": "issued"},
            {"name": "day", "path": "effective.ofType(dateTime)", "tag": [{"name": "ansi/type", "value": "DATE"}]},
            {"name": "n", "path": "component.count()"},
            {"name": "codes", "path": "code.coding.code", "collection": true}]}]}"#;
        let obs = r#"{"resourceType": "Observation", "valueQuantity": {"value": 72.50}, "issued": "2015-02-07T13:28:17.239+02:00",
            "effectiveDateTime": "2015-02-07", "code": {"coding": [{"code": "a"}, {"code": "b"}]}}"#;
        let b = batch(view, &[obs]).unwrap();
        let s = b.schema();
        let types: Vec<String> = s
            .fields()
            .iter()
            .map(|f| f.data_type().to_string())
            .collect();
        assert_eq!(
            types,
            [
                "Utf8",
                "Decimal128(6, 2)",
                "Timestamp(µs, \"+00:00\")",
                "Date32",
                "Int32",
                "List(Utf8)"
            ]
        );
        assert_eq!(
            b.column(0).as_string::<i32>().value(0),
            "72.50",
            "a decimal keeps its digits"
        );
        assert_eq!(
            b.column(2)
                .as_primitive::<TimestampMicrosecondType>()
                .value(0),
            1_423_308_497_239_000
        );
        assert_eq!(b.column(3).as_primitive::<Date32Type>().value(0), 16_473);
        assert_eq!(b.column(4).as_primitive::<Int32Type>().value(0), 0);
        // A partial date cannot be a DATE: the batch fails, naming the column.
        let partial = obs.replace("2015-02-07\"", "2015-02\"");
        let e = batch(view, &[&partial]).unwrap_err().to_string();
        assert!(e.contains("column 'day' as Date32"), "{e}");
    }
}
