//! Dates, date-times and times as FHIRPath compares them (to the precision
//! both have; unknown past it) and their boundaries (`lowBoundary`,
//! `highBoundary`: the earliest and latest instant a partial value can
//! stand for).

use std::borrow::Cow;
use std::cmp::Ordering;

use super::eval::Value;

/// A date or date-time's components, as many as were written, and its
/// offset from UTC in minutes when one was written.
#[derive(Debug, PartialEq)]
struct Parts {
    /// Year, month, day, hour, minute, second (with its fraction).
    fields: Vec<f64>,
    offset: Option<i32>,
}

fn split_offset(time: &str) -> (&str, Option<&str>) {
    if let Some(t) = time.strip_suffix('Z') {
        return (t, Some("Z"));
    }
    match time.rfind(['+', '-']) {
        Some(i) => (&time[..i], Some(&time[i..])),
        None => (time, None),
    }
}

fn offset_minutes(tz: &str) -> Option<i32> {
    if tz == "Z" {
        return Some(0);
    }
    let sign = if tz.starts_with('-') { -1 } else { 1 };
    let (h, m) = tz[1..].split_once(':')?;
    Some(sign * (h.parse::<i32>().ok()? * 60 + m.parse::<i32>().ok()?))
}

fn parse_date_time(s: &str) -> Option<Parts> {
    let (date, time) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let mut fields: Vec<f64> = Vec::new();
    for p in date.split('-') {
        fields.push(p.parse().ok()?);
    }
    let mut offset = None;
    if let Some(time) = time.filter(|t| !t.is_empty()) {
        let (clock, tz) = split_offset(time);
        for p in clock.split(':') {
            fields.push(p.parse().ok()?);
        }
        offset = tz.and_then(offset_minutes);
    }
    Some(Parts { fields, offset })
}

fn parse_time(s: &str) -> Option<Vec<f64>> {
    s.split(':').map(|p| p.parse().ok()).collect()
}

fn compare_fields(a: &[f64], b: &[f64]) -> Option<Ordering> {
    for (x, y) in a.iter().zip(b) {
        match x.partial_cmp(y)? {
            Ordering::Equal => {}
            o => return Some(o),
        }
    }
    // Equal as far as both go: equal only if they go equally far (seconds
    // and their fraction count as one precision).
    (a.len() == b.len()).then_some(Ordering::Equal)
}

/// Order of two dates or date-times; None when it depends on digits one of
/// them lacks.
pub fn compare(a: &str, b: &str) -> Option<Ordering> {
    let (mut pa, mut pb) = (parse_date_time(a)?, parse_date_time(b)?);
    if let (Some(oa), Some(ob)) = (pa.offset, pb.offset) {
        if oa != ob && pa.fields.len() >= 5 && pb.fields.len() >= 5 {
            // Compare in UTC: shift minutes, carrying through the hour; a
            // day boundary crossed this way is rare enough to compare as
            // text of the shifted clock, which stays ordered within a day.
            shift(&mut pa.fields, -oa);
            shift(&mut pb.fields, -ob);
        }
    }
    compare_fields(&pa.fields, &pb.fields)
}

/// Adds `minutes` to a date-time's fields (year, month, day, hour, minute).
fn shift(f: &mut [f64], minutes: i32) {
    let total = f[3] * 60.0 + f[4] + minutes as f64;
    let days = (total / 1440.0).floor();
    let rest = total - days * 1440.0;
    f[3] = (rest / 60.0).floor();
    f[4] = rest % 60.0;
    if days != 0.0 {
        let (mut y, mut m, mut d) = (f[0] as i32, f[1] as u32, f[2] as i32 + days as i32);
        if d < 1 {
            m = if m == 1 {
                y -= 1;
                12
            } else {
                m - 1
            };
            d = days_in_month(y, m) as i32;
        } else if d > days_in_month(y, m) as i32 {
            d = 1;
            m = if m == 12 {
                y += 1;
                1
            } else {
                m + 1
            };
        }
        f[0] = y as f64;
        f[1] = m as f64;
        f[2] = d as f64;
    }
}

pub fn compare_time(a: &str, b: &str) -> Option<Ordering> {
    compare_fields(&parse_time(a)?, &parse_time(b)?)
}

fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `YYYY[-MM[-DD]]` filled to a whole date, at its start or end.
fn date_boundary(date: &str, high: bool) -> Option<String> {
    let mut it = date.split('-');
    let year: i32 = it.next()?.parse().ok()?;
    let month: Option<u32> = it
        .next()
        .map(|m| m.parse().ok())
        .unwrap_or(Some(0))
        .filter(|m| *m != 0);
    let day = it.next();
    let month = month.unwrap_or(if high { 12 } else { 1 });
    let day = match day {
        Some(d) => d.to_string(),
        None => format!("{:02}", if high { days_in_month(year, month) } else { 1 }),
    };
    Some(format!("{year:04}-{month:02}-{day}"))
}

/// `hh[:mm[:ss[.fff]]]` filled to milliseconds, at its start or end.
fn clock_boundary(clock: &str, high: bool) -> Option<String> {
    let mut parts = clock.split(':');
    let h = parts.next().filter(|h| h.len() == 2)?;
    let m = parts.next();
    let s = parts.next();
    let fill = |n: &str| {
        if high {
            n.to_string()
        } else {
            "00".to_string()
        }
    };
    let m = m.map_or_else(|| fill("59"), str::to_string);
    let s = match s {
        None => format!("{}.{}", fill("59"), if high { "999" } else { "000" }),
        Some(s) => match s.split_once('.') {
            None => format!("{s}.{}", if high { "999" } else { "000" }),
            Some((whole, frac)) => {
                let pad = if high { '9' } else { '0' };
                let mut f: String = frac.chars().take(3).collect();
                while f.len() < 3 {
                    f.push(pad);
                }
                format!("{whole}.{f}")
            }
        },
    };
    Some(format!("{h}:{m}:{s}"))
}

/// The low or high boundary of a decimal, quantity, date, date-time or time.
pub fn boundary<'a>(v: &Value<'a>, high: bool) -> Option<Value<'a>> {
    let half_step = |scale: u8| 0.5 * 10f64.powi(-(scale as i32));
    let sign = if high { 1.0 } else { -1.0 };
    Some(match v {
        Value::Int(i) => Value::Dec(*i as f64 + sign * 0.5, 1),
        Value::Dec(d, s) => Value::Dec(d + sign * half_step(*s), s + 1),
        Value::Quantity(d, s, u) => Value::Quantity(d + sign * half_step(*s), s + 1, u.clone()),
        Value::Date(d) => Value::Date(Cow::Owned(date_boundary(d, high)?)),
        Value::DateTime(dt) => {
            let (date, time) = match dt.split_once('T') {
                Some((d, t)) => (d, t),
                None => (dt.as_ref(), ""),
            };
            let (clock, tz) = split_offset(time);
            let clock = if clock.is_empty() { "00" } else { clock };
            let clock = if time.is_empty() && high { "23" } else { clock };
            let tz = tz.unwrap_or(if high { "-12:00" } else { "+14:00" });
            Value::DateTime(Cow::Owned(format!(
                "{}T{}{tz}",
                date_boundary(date, high)?,
                clock_boundary(clock, high)?
            )))
        }
        Value::Time(t) => Value::Time(Cow::Owned(clock_boundary(t, high)?)),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(v: Option<Value<'_>>) -> String {
        match v.unwrap() {
            Value::Date(s) | Value::DateTime(s) | Value::Time(s) => s.into_owned(),
            Value::Dec(d, s) => format!("{d:.*}", s as usize),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn boundaries_of_partial_values() {
        let d = |s: &'static str| Value::Date(s.into());
        let dt = |s: &'static str| Value::DateTime(s.into());
        let t = |s: &'static str| Value::Time(s.into());
        assert_eq!(text(boundary(&Value::Dec(1.0, 1), false)), "0.95");
        assert_eq!(text(boundary(&Value::Dec(1.0, 1), true)), "1.05");
        assert_eq!(text(boundary(&Value::Dec(1.587, 3), false)), "1.5865");
        assert_eq!(text(boundary(&d("1970-06"), false)), "1970-06-01");
        assert_eq!(text(boundary(&d("1970-06"), true)), "1970-06-30");
        assert_eq!(text(boundary(&d("2024-02"), true)), "2024-02-29");
        assert_eq!(text(boundary(&d("1970"), true)), "1970-12-31");
        assert_eq!(
            text(boundary(&dt("2010-10-10"), false)),
            "2010-10-10T00:00:00.000+14:00"
        );
        assert_eq!(
            text(boundary(&dt("2010-10-10"), true)),
            "2010-10-10T23:59:59.999-12:00"
        );
        assert_eq!(
            text(boundary(&dt("2010-10-10T10:30Z"), true)),
            "2010-10-10T10:30:59.999Z"
        );
        assert_eq!(text(boundary(&t("12:34:00"), false)), "12:34:00.000");
        assert_eq!(text(boundary(&t("12:34:00"), true)), "12:34:00.999");
        assert_eq!(text(boundary(&t("12:34:00.1"), true)), "12:34:00.199");
    }

    #[test]
    fn comparison_to_the_common_precision() {
        assert_eq!(compare("2020-01-02", "2020-01-03"), Some(Ordering::Less));
        assert_eq!(compare("2020-01", "2020-02-03"), Some(Ordering::Less));
        assert_eq!(compare("2020-01", "2020-01-03"), None);
        assert_eq!(
            compare("2020-01-01T10:00:00+02:00", "2020-01-01T08:00:00Z"),
            Some(Ordering::Equal)
        );
        assert_eq!(
            compare(
                "2015-02-07T13:28:17.239+02:00",
                "2015-02-07T13:28:17.239+02:00"
            ),
            Some(Ordering::Equal)
        );
        assert_eq!(compare_time("18:12:00", "18:12:00"), Some(Ordering::Equal));
    }
}
