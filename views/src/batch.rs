//! A view's rows as Arrow record batches: `boolean` columns as Boolean,
//! integers as Int64, decimals as Float64, text (strings, codes, dates and
//! times as written) and complex values (their JSON) as Utf8;
//! `collection: true` columns as lists of those.

use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, ListBuilder,
    StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

use crate::check::ColumnKind;
use crate::definition::View;
use crate::run::Cell;

fn data_type(kind: ColumnKind) -> DataType {
    match kind {
        ColumnKind::Bool => DataType::Boolean,
        ColumnKind::Int => DataType::Int64,
        ColumnKind::Dec => DataType::Float64,
        ColumnKind::Str | ColumnKind::Json => DataType::Utf8,
    }
}

/// The Arrow schema of a view's output.
pub fn schema(view: &View) -> SchemaRef {
    let fields: Vec<Field> = view
        .columns
        .iter()
        .map(|c| {
            let t = data_type(c.kind);
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
        ColumnKind::Dec => Box::new(Float64Builder::new()),
        ColumnKind::Str | ColumnKind::Json => Box::new(StringBuilder::new()),
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
            let b = any.downcast_mut::<Float64Builder>().expect("float builder");
            match cell {
                Cell::Dec(v, _) => b.append_value(*v),
                Cell::Int(v) => b.append_value(*v as f64),
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

    /// The rows pushed since the last call, as one batch.
    pub fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        let arrays: Vec<ArrayRef> = self
            .cols
            .iter_mut()
            .map(|c| match c {
                Col::One(b, _) => b.finish(),
                Col::List(b, _) => Arc::new(b.finish()) as ArrayRef,
            })
            .collect();
        self.rows = 0;
        RecordBatch::try_new(self.schema.clone(), arrays)
    }
}
