//! The Arrow plumbing shared by the string UDFs, written once: arguments may
//! be scalars or arrays of Utf8, LargeUtf8 or Utf8View; each function file
//! supplies only its per-row logic.

use std::borrow::Cow;
use std::sync::Arc;

use arrow::array::builder::make_view;
use arrow::array::{Array, ArrayRef, AsArray, StringBuilder, StringViewArray};
use arrow::buffer::{Buffer, NullBuffer};
use arrow::datatypes::DataType;
use datafusion::common::{exec_err, Result};
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs};

/// Read access to one string argument, whatever its Arrow encoding.
enum StrColumn<'a> {
    Utf8(&'a arrow::array::StringArray),
    Large(&'a arrow::array::LargeStringArray),
    View(&'a arrow::array::StringViewArray),
}

impl StrColumn<'_> {
    fn get(&self, i: usize) -> Option<&str> {
        match self {
            StrColumn::Utf8(a) => a.is_valid(i).then(|| a.value(i)),
            StrColumn::Large(a) => a.is_valid(i).then(|| a.value(i)),
            StrColumn::View(a) => a.is_valid(i).then(|| a.value(i)),
        }
    }
}

fn str_column<'a>(name: &str, array: &'a ArrayRef) -> Result<StrColumn<'a>> {
    Ok(match array.data_type() {
        DataType::Utf8 => StrColumn::Utf8(array.as_string::<i32>()),
        DataType::LargeUtf8 => StrColumn::Large(array.as_string::<i64>()),
        DataType::Utf8View => StrColumn::View(array.as_string_view()),
        other => return exec_err!("{name} expects string arguments, got {other}"),
    })
}

/// Calls `f` for each row of string arguments with one `Option<&str>` per
/// argument (None for SQL NULL). Returns the number of rows.
pub(crate) fn for_each_row<F>(name: &str, args: &ScalarFunctionArgs, mut f: F) -> Result<usize>
where
    F: for<'r> FnMut(&[Option<&'r str>]),
{
    let rows = args.number_rows;
    let arrays = ColumnarValue::values_to_arrays(&args.args)?;
    let columns = arrays
        .iter()
        .map(|a| str_column(name, a))
        .collect::<Result<Vec<_>>>()?;
    let mut row: Vec<Option<&str>> = Vec::with_capacity(columns.len());
    for i in 0..rows {
        row.clear();
        row.extend(columns.iter().map(|c| c.get(i)));
        f(&row);
    }
    Ok(rows)
}

/// Evaluates `f` row by row over string arguments and returns a Utf8 column.
/// `f` gets one `Option<&str>` per argument (None for SQL NULL) and returns
/// the row's value (None for NULL).
pub(crate) fn map_strings<F>(
    name: &str,
    args: ScalarFunctionArgs,
    mut f: F,
) -> Result<ColumnarValue>
where
    F: for<'r> FnMut(&[Option<&'r str>]) -> Option<Cow<'r, str>>,
{
    let mut out = StringBuilder::with_capacity(args.number_rows, 0);
    for_each_row(name, &args, |row| match f(row) {
        Some(v) => out.append_value(v),
        None => out.append_null(),
    })?;
    Ok(ColumnarValue::Array(Arc::new(out.finish())))
}

/// `array` with the rows of `edits` (row, new text) given new text and the
/// rows `nulls` marks as null made NULL. The other rows' views and all of
/// `array`'s data buffers are shared, not copied; the new texts go to new
/// buffers.
pub fn replace_views<'a>(
    array: &StringViewArray,
    edits: impl IntoIterator<Item = (usize, &'a str)>,
    nulls: Option<&NullBuffer>,
) -> StringViewArray {
    let mut views: Vec<u128> = array.views().to_vec();
    let mut buffers: Vec<Buffer> = array.data_buffers().to_vec();
    let mut data: Vec<u8> = Vec::new();
    for (row, text) in edits {
        let bytes = text.as_bytes();
        // A view addresses its buffer with 32-bit offsets.
        if data.len() + bytes.len() > u32::MAX as usize {
            buffers.push(Buffer::from_vec(std::mem::take(&mut data)));
        }
        views[row] = make_view(bytes, buffers.len() as u32, data.len() as u32);
        if bytes.len() > 12 {
            // Longer texts live in the buffer; shorter ones in the view.
            data.extend_from_slice(bytes);
        }
    }
    if !data.is_empty() {
        buffers.push(Buffer::from_vec(data));
    }
    let nulls = NullBuffer::union(array.nulls(), nulls);
    // SAFETY: every view is either one of `array`'s, valid for its buffers,
    // which keep their indexes, or was made above over a `&str` copied whole
    // into the buffer its index and offset name.
    unsafe { StringViewArray::new_unchecked(views.into(), buffers, nulls) }
}
