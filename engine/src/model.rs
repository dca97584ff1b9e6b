//! The record model (DESIGN.md, "The record model"): one NDJSON line is one
//! Arrow row holding the exact line text, its partition, its lineage and the
//! few key columns curation needs.

use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayBuilder, ArrayRef, Date32Array, DictionaryArray, Int32Array, RecordBatch, StringArray,
    StringBuilder, StringViewArray, StringViewBuilder, TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow::buffer::Buffer;
use arrow::datatypes::{DataType, Field, Int32Type, Schema, SchemaRef, TimeUnit};

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::curate::parse::Keys;

/// Which columns a [`RowsBuilder`] fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// The record model with an `error` column: every line of a raw file.
    Raw,
    /// The record model: every line of a curated file.
    Curated,
    /// Key columns plus `content_hash` (of the line) and `key_hash` (of
    /// tenant, resource type and id), no text: what dedup reads.
    Keyed,
    /// The record model with the per-file columns dictionary encoded (as in
    /// `Keyed`) and the text as string views: what curation rules read.
    /// Curation builds it with [`rules_batch`] from the key rows and views
    /// into the buffers the lines were read into ([`TextViews`]), copying
    /// neither a file's name onto every row nor any line's text (a
    /// [`RowsBuilder`] does not make this shape).
    Rules,
}

fn partition_and_lineage() -> Vec<Field> {
    vec![
        Field::new("tenant_guid", DataType::Utf8, false),
        Field::new("source_system", DataType::Utf8, true),
        Field::new("import_date", DataType::Date32, false),
        Field::new("source_file", DataType::Utf8, false),
        Field::new("line_no", DataType::UInt64, false),
        Field::new("resource_type", DataType::Utf8, true),
        Field::new("id", DataType::Utf8, true),
        Field::new("version_id", DataType::Utf8, true),
        Field::new(
            "last_updated",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
    ]
}

static RAW: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut f = partition_and_lineage();
    f.push(Field::new("resource", DataType::Utf8, false));
    f.push(Field::new("error", DataType::Utf8, true));
    Arc::new(Schema::new(f))
});
static CURATED: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut f = partition_and_lineage();
    f.push(Field::new("resource", DataType::Utf8, false));
    Arc::new(Schema::new(f))
});
/// The columns that are the same for every row of a file are dictionary
/// encoded in the keyed table: dedup's memory is then mostly the ids.
const KEYED_PER_FILE: [&str; 3] = ["tenant_guid", "source_system", "source_file"];

/// The partition and lineage columns with the per-file ones dictionary encoded.
fn per_file_dictionaries() -> Vec<Field> {
    partition_and_lineage()
        .into_iter()
        .map(|f| {
            if KEYED_PER_FILE.contains(&f.name().as_str()) {
                let dict =
                    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
                Field::new(f.name(), dict, f.is_nullable())
            } else {
                f
            }
        })
        .collect()
}

static KEYED: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut f = per_file_dictionaries();
    f.push(Field::new("content_hash", DataType::UInt64, false));
    f.push(Field::new("key_hash", DataType::UInt64, false));
    Arc::new(Schema::new(f))
});

static RULES: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut f = per_file_dictionaries();
    f.push(Field::new("resource", DataType::Utf8View, false));
    Arc::new(Schema::new(f))
});

pub fn schema(shape: Shape) -> SchemaRef {
    match shape {
        Shape::Raw => RAW.clone(),
        Shape::Curated => CURATED.clone(),
        Shape::Keyed => KEYED.clone(),
        Shape::Rules => RULES.clone(),
    }
}

/// The rules' rows (`Rules`) from key rows (`Keyed`, whose columns have the
/// same types) and the lines' texts.
pub fn rules_batch(keyed: &RecordBatch, texts: StringViewArray) -> RecordBatch {
    let schema = schema(Shape::Rules);
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| match f.name().as_str() {
            "resource" => Arc::new(texts.clone()) as ArrayRef,
            name => keyed
                .column_by_name(name)
                .expect("keyed has the model's keys")
                .clone(),
        })
        .collect();
    RecordBatch::try_new(schema, columns).expect("record model")
}

/// Where the rows of one file come from.
#[derive(Debug, Clone)]
pub struct FileOrigin {
    pub tenant: String,
    pub source_system: Option<String>,
    pub import_date: i32,
    pub source_file: String,
}

/// Builds record-model batches for the rows of one file.
pub struct RowsBuilder {
    shape: Shape,
    origin: FileOrigin,
    rows: usize,
    line_no: UInt64Builder,
    resource_type: StringBuilder,
    id: StringBuilder,
    version_id: StringBuilder,
    last_updated: TimestampMicrosecondBuilder,
    resource: StringBuilder,
    error: StringBuilder,
    content_hash: UInt64Builder,
    key_hash: UInt64Builder,
}

impl RowsBuilder {
    pub fn new(shape: Shape, origin: FileOrigin) -> Self {
        assert_ne!(shape, Shape::Rules, "rules batches are made by rules_batch");
        RowsBuilder {
            shape,
            origin,
            rows: 0,
            line_no: UInt64Builder::new(),
            resource_type: StringBuilder::new(),
            id: StringBuilder::new(),
            version_id: StringBuilder::new(),
            last_updated: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            resource: StringBuilder::new(),
            error: StringBuilder::new(),
            content_hash: UInt64Builder::new(),
            key_hash: UInt64Builder::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    /// Bytes of resource text held so far (for batches capped by size).
    pub fn text_bytes(&self) -> usize {
        self.resource.values_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// A line that passed step 1.
    pub fn push_keys(&mut self, line_no: u64, k: &Keys<'_>) {
        self.rows += 1;
        self.line_no.append_value(line_no);
        self.resource_type.append_value(k.resource_type);
        self.id.append_value(&k.id);
        self.version_id.append_option(k.version_id.as_deref());
        self.last_updated.append_option(k.last_updated);
        match self.shape {
            Shape::Keyed => {
                self.content_hash.append_value(xxh3_64(k.text.as_bytes()));
                // (tenant, resource type, id); the tenant is the file's.
                let mut h = Xxh3::new();
                for part in [self.origin.tenant.as_str(), k.resource_type, &k.id] {
                    h.update(part.as_bytes());
                    h.update(b"/");
                }
                self.key_hash.append_value(h.digest());
            }
            Shape::Raw => {
                self.resource.append_value(k.text);
                self.error.append_null();
            }
            Shape::Curated => self.resource.append_value(k.text),
            Shape::Rules => unreachable!("checked in new"),
        }
    }

    /// A line that failed step 1 (raw tables show it with its reason).
    pub fn push_rejected(
        &mut self,
        line_no: u64,
        resource_type: Option<&str>,
        id: Option<&str>,
        text: &str,
        error: &str,
    ) {
        debug_assert_eq!(self.shape, Shape::Raw);
        self.rows += 1;
        self.line_no.append_value(line_no);
        self.resource_type.append_option(resource_type);
        self.id.append_option(id);
        self.version_id.append_null();
        self.last_updated.append_null();
        self.resource.append_value(text);
        self.error.append_value(error);
    }

    /// The rows so far as one batch; the builder is empty afterwards.
    pub fn finish(&mut self) -> RecordBatch {
        let n = std::mem::take(&mut self.rows);
        let o = &self.origin;
        let keyed = matches!(self.shape, Shape::Keyed | Shape::Rules);
        // A value that is the same on every row of the file.
        let repeat = |v: Option<&str>| -> ArrayRef {
            match (v, keyed) {
                (Some(v), true) => {
                    let values = Arc::new(StringArray::from(vec![v]));
                    Arc::new(DictionaryArray::<Int32Type>::new(
                        Int32Array::from(vec![0; n]),
                        values,
                    ))
                }
                (None, true) => Arc::new(DictionaryArray::<Int32Type>::new(
                    Int32Array::new_null(n),
                    Arc::new(StringArray::new_null(0)),
                )),
                (Some(v), false) => {
                    Arc::new(StringArray::from_iter_values(std::iter::repeat_n(v, n)))
                }
                (None, false) => Arc::new(StringArray::new_null(n)),
            }
        };
        let mut cols: Vec<ArrayRef> = vec![
            repeat(Some(&o.tenant)),
            repeat(o.source_system.as_deref()),
            Arc::new(Date32Array::from(vec![o.import_date; n])),
            repeat(Some(&o.source_file)),
            Arc::new(self.line_no.finish()),
            Arc::new(self.resource_type.finish()),
            Arc::new(self.id.finish()),
            Arc::new(self.version_id.finish()),
            Arc::new(self.last_updated.finish()),
        ];
        match self.shape {
            Shape::Keyed => {
                cols.push(Arc::new(self.content_hash.finish()));
                cols.push(Arc::new(self.key_hash.finish()));
            }
            Shape::Raw => {
                cols.push(Arc::new(self.resource.finish()));
                cols.push(Arc::new(self.error.finish()));
            }
            Shape::Curated => cols.push(Arc::new(self.resource.finish())),
            Shape::Rules => unreachable!("checked in new"),
        }
        RecordBatch::try_new(schema(self.shape), cols).expect("columns match the schema")
    }
}

/// A column of line texts built as string views into the buffers the lines
/// were read into ([`crate::raw::lines::Line::Text`]'s `block`): a row costs
/// 16 bytes of view, and the text is never copied. The column keeps each
/// block alive until it is dropped.
#[derive(Default)]
pub struct TextViews {
    builder: StringViewBuilder,
    /// The block added last and its index in the builder: consecutive lines
    /// share one.
    last: Option<(Buffer, u32)>,
}

impl TextViews {
    /// Appends `text`, which should lie inside `block`; a text that does not
    /// is copied.
    pub fn push(&mut self, text: &str, block: &Buffer) {
        let offset = (text.as_ptr() as usize).wrapping_sub(block.as_ptr() as usize);
        let inside = offset <= block.len() && text.len() <= block.len() - offset;
        if !inside || block.len() >= u32::MAX as usize {
            return self.builder.append_value(text);
        }
        let index = match &self.last {
            Some((b, i)) if b.as_ptr() == block.as_ptr() && b.len() == block.len() => *i,
            _ => {
                let i = self.builder.append_block(block.clone());
                self.last = Some((block.clone(), i));
                i
            }
        };
        // SAFETY: block `index` was added by `append_block` above, the range
        // `offset..offset + len` was checked to be inside it, and the bytes
        // there are `text`, valid UTF-8.
        unsafe {
            self.builder
                .append_view_unchecked(index, offset as u32, text.len() as u32)
        }
    }

    pub fn len(&self) -> usize {
        self.builder.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The texts so far; the builder is empty afterwards.
    pub fn finish(&mut self) -> StringViewArray {
        self.last = None;
        self.builder.finish()
    }
}
