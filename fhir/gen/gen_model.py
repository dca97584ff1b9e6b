#!/usr/bin/env python3
"""Generates fhir/src/model.rs, the tables the validator walks, from the FHIR R4
core package (hl7.fhir.r4.core#4.0.1, CC0, HL7).

Usage: python3 fhir/gen/gen_model.py [PACKAGE_DIR [OUT_FILE]]
(defaults: ../shared/fhir-r4/package beside the repository, fhir/src/model.rs)

The output is committed; running this again on the same package gives the same
bytes (everything is sorted). What it reads:

* StructureDefinitions of kind primitive-type, complex-type and resource that
  are specializations (the base types; profiles are left out). Each element of
  a snapshot becomes an entry of its parent's table: its JSON name, cardinality,
  type, required binding and Reference target types. (The only maxLength in
  the base definitions is string's 1 MB, which the validator knows.) An element with
  children (a BackboneElement or Element) becomes a type of its own, named by
  its path; `contentReference` points at such a type. A choice `value[x]`
  becomes one entry per allowed type (`valueQuantity`, ...) sharing one slot.
* ValueSets and CodeSystems, for required bindings on `code` and
  `CodeableConcept` elements: a value set is used only when it is fully defined
  in the package (every include names codes, or a whole CodeSystem whose
  content is complete, or another such value set; no filters). Bindings to
  value sets that are not fully defined here are not checked.
"""
import glob
import json
import os
import sys

PACKAGE = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "shared", "fhir-r4", "package")
OUT = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "..", "src", "model.rs")
SYSTEM_STRING = "http://hl7.org/fhirpath/System.String"
FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"

PRIMITIVES = ["base64Binary", "boolean", "canonical", "code", "date", "dateTime", "decimal",
              "id", "instant", "integer", "markdown", "oid", "positiveInt", "string", "time",
              "unsignedInt", "uri", "url", "uuid", "xhtml"]


def load(pattern):
    out = {}
    for path in sorted(glob.glob(os.path.join(PACKAGE, pattern))):
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        out[d["url"]] = d
    return out


sds = load("StructureDefinition-*.json")
value_sets = load("ValueSet-*.json")
code_systems = load("CodeSystem-*.json")

base = {}
for sd in sds.values():
    if sd["kind"] in ("complex-type", "resource", "primitive-type") and sd.get("derivation") == "specialization":
        base[sd["type"]] = sd
resource_types = sorted(t for t, sd in base.items() if sd["kind"] == "resource" and not sd.get("abstract"))
complex_types = sorted(t for t, sd in base.items() if sd["kind"] == "complex-type" and not sd.get("abstract"))
assert sorted(t for t, sd in base.items() if sd["kind"] == "primitive-type") == sorted(PRIMITIVES)

# ---- value sets -----------------------------------------------------------

def cs_codes(concepts):
    for c in concepts or []:
        yield c["code"]
        yield from cs_codes(c.get("concept"))


def expand(url, seen=()):
    """{system: set(codes)} or None when the value set is not fully defined here."""
    url = url.split("|")[0]
    vs = value_sets.get(url)
    if vs is None or url in seen:
        return None
    compose = vs.get("compose")
    if not compose:
        return None
    out = {}

    def part(inc):
        if "filter" in inc:
            return None
        got = {}
        if "valueSet" in inc:
            for u in inc["valueSet"]:
                e = expand(u, seen + (url,))
                if e is None:
                    return None
                for s, cs in e.items():
                    got.setdefault(s, set()).update(cs)
        if "system" in inc:
            if "concept" in inc:
                got.setdefault(inc["system"], set()).update(c["code"] for c in inc["concept"])
            else:
                cs = code_systems.get(inc["system"])
                if cs is None or cs.get("content") != "complete":
                    return None
                got.setdefault(inc["system"], set()).update(cs_codes(cs.get("concept")))
        return got

    for inc in compose.get("include", []):
        got = part(inc)
        if got is None:
            return None
        for s, cs in got.items():
            out.setdefault(s, set()).update(cs)
    for exc in compose.get("exclude", []):
        got = part(exc)
        if got is None:
            return None
        for s, cs in got.items():
            out.get(s, set()).difference_update(cs)
    if not any(out.values()):
        return None
    return out


vs_index = {}   # url -> index
vs_table = []   # (url, {system: codes})


def binding_of(el, type_code):
    b = el.get("binding")
    if not b or b.get("strength") != "required" or "valueSet" not in b:
        return 0
    if type_code not in ("code", "CodeableConcept"):
        return 0
    url = b["valueSet"].split("|")[0]
    if url not in vs_index:
        e = expand(url)
        if e is None:
            vs_index[url] = 0
        else:
            vs_table.append((url, e))
            vs_index[url] = len(vs_table)
    return vs_index[url]

# ---- types ----------------------------------------------------------------

types = {}      # name -> dict(kind, slots, elems)
order = []      # type names, in id order


def add_type(name, kind):
    types[name] = {"kind": kind, "slots": [], "elems": []}
    order.append(name)


for p in sorted(PRIMITIVES):
    add_type(p, "Prim")
add_type("Resource", "AnyResource")
add_type("Element", "Complex")  # the object of a primitive's `_x` extension
for t in complex_types:
    add_type(t, "Complex")
for t in resource_types:
    add_type(t, "Resource")

targets_index = {(): 0}
targets_table = [()]


def targets_of(t):
    profs = t.get("targetProfile") or []
    names = tuple(sorted({p.rsplit("/", 1)[-1] for p in profs}))
    if not names or "Resource" in names:
        return 0
    for n in names:
        assert n in resource_types, n
    if names not in targets_index:
        targets_index[names] = len(targets_table)
        targets_table.append(names)
    return targets_index[names]


def type_code(el, t, owner):
    code = t["code"]
    if code == SYSTEM_STRING:
        ext = {e["url"]: e.get("valueUrl") for e in t.get("extension", [])}
        code = ext.get(FHIR_TYPE_EXT, "string")
    if el["path"].endswith(".id") and el.get("base", {}).get("path") == "Resource.id":
        code = "id"  # HealthLake and FHIR: a resource id is an `id`
    return code


def fill(type_name, owner_path, elements):
    """Entries of `type_name`: the children of `owner_path` among `elements`."""
    prefix = owner_path + "."
    children = [e for e in elements if e["path"].startswith(prefix) and "." not in e["path"][len(prefix):]]
    tdef = types[type_name]
    for el in children:
        name = el["path"][len(prefix):]
        has_children = any(e["path"].startswith(el["path"] + ".") for e in elements)
        slot = len(tdef["slots"])
        mx = el["max"]
        tdef["slots"].append({"name": name, "min": el["min"], "max": None if mx == "*" else int(mx),
                              "choice": name.endswith("[x]")})
        if "contentReference" in el:
            ref = el["contentReference"].split("#", 1)[1]
            tdef["elems"].append({"key": name, "slot": slot, "ty": ref, "binding": 0, "targets": 0})
            continue
        if has_children:
            sub = el["path"]
            add_type(sub, "Backbone")
            fill(sub, el["path"], elements)
            tdef["elems"].append({"key": name, "slot": slot, "ty": sub, "binding": 0, "targets": 0})
            continue
        for t in el.get("type", []):
            code = type_code(el, t, type_name)
            key = name[:-3] + code[0].upper() + code[1:] if name.endswith("[x]") else name
            if code in ("Element", "BackboneElement"):
                raise SystemExit(f"{el['path']}: {code} without children")
            tdef["elems"].append({
                "key": key, "slot": slot, "ty": code, "binding": binding_of(el, code),
                "targets": targets_of(t) if code == "Reference" else 0,
            })


# What the validator keeps of a value: the id of a resource, the string of a
# Reference, the system and code of a Coding.
KEEP = {("Resource", "id"): "Id", ("Reference", "reference"): "Reference",
        ("Coding", "system"): "System", ("Coding", "code"): "Code"}


def keep_of(type_name, kind, key):
    return KEEP.get(("Resource" if kind == "Resource" else type_name, key), "No")


element_sd = sds["http://hl7.org/fhir/StructureDefinition/Element"]
fill("Element", "Element", element_sd["snapshot"]["element"])
for t in complex_types + resource_types:
    sd = base[t]
    fill(t, t, sd["snapshot"]["element"])

type_id = {n: i for i, n in enumerate(order)}
for name, tdef in types.items():
    for e in tdef["elems"]:
        if e["ty"] not in type_id:
            raise SystemExit(f"{name}.{e['key']}: unknown type {e['ty']}")
    tdef["elems"].sort(key=lambda e: e["key"].encode())
    keys = [e["key"] for e in tdef["elems"]]
    assert len(keys) == len(set(keys)), (name, keys)
    assert len(tdef["slots"]) <= 128, name


def rs(s):
    return json.dumps(s)


def maxv(m):
    return "MANY" if m is None else str(m)


lines = []
w = lines.append
w("//! The FHIR R4 (4.0.1) model the validator walks.")
w("//!")
w("//! Generated by `fhir/gen/gen_model.py` from the core package")
w("//! `hl7.fhir.r4.core#4.0.1` (CC0, HL7). Do not edit by hand.")
w("")
w("#![allow(clippy::all)]")
w("")
w("use crate::model_types::*;")
w("")
w(f"/// The resource types, sorted.")
w(f"pub const RESOURCE_TYPES: [&str; {len(resource_types)}] = [")
for t in resource_types:
    w(f"    {rs(t)},")
w("];")
w("")
w("/// The type id of each entry of [`RESOURCE_TYPES`].")
w(f"pub const RESOURCE_TYPE_IDS: [TypeId; {len(resource_types)}] = [")
for t in resource_types:
    w(f"    {type_id[t]},")
w("];")
w("")
w(f"pub const ANY_RESOURCE: TypeId = {type_id['Resource']};")
for p in PRIMITIVES:
    w(f"pub const T_{p.upper()}: TypeId = {type_id[p]};")
for c in ("Element", "Reference", "Coding", "CodeableConcept"):
    w(f"pub const T_{c.upper()}: TypeId = {type_id[c]};")
w("")
w("/// Reference target types, by the index an element gives (0: any).")
w(f"pub static TARGETS: [&[&str]; {len(targets_table)}] = [")
for names in targets_table:
    w("    &[" + ", ".join(rs(n) for n in names) + "],")
w("];")
w("")
w("/// Value sets of required bindings, by the index an element gives, minus one.")
w(f"pub static VALUE_SETS: [ValueSet; {len(vs_table)}] = [")
for url, systems in vs_table:
    w(f"    ValueSet {{ url: {rs(url)}, systems: &[")
    for s in sorted(systems):
        codes = sorted(systems[s], key=lambda c: c.encode())
        w(f"        ({rs(s)}, &[" + ", ".join(rs(c) for c in codes) + "]),")
    w("    ] },")
w("];")
w("")
w(f"pub static TYPES: [TypeDef; {len(order)}] = [")
for name in order:
    t = types[name]
    w(f"    TypeDef {{ name: {rs(name)}, kind: Kind::{t['kind']}, slots: &[")
    for s in t["slots"]:
        w(f"        Slot {{ name: {rs(s['name'])}, min: {s['min']}, max: {maxv(s['max'])}, choice: {str(s['choice']).lower()} }},")
    w("    ], elems: &[")
    for e in t["elems"]:
        keep = keep_of(name, t["kind"], e["key"])
        w(f"        Elem {{ key: {rs(e['key'])}, slot: {e['slot']}, ty: {type_id[e['ty']]}, binding: {e['binding']}, targets: {e['targets']}, keep: Keep::{keep} }},")
    req = [i for i, s in enumerate(t["slots"]) if s["min"] > 0]
    w("    ], required: &[" + ", ".join(map(str, req)) + "] },")
w("];")
with open(OUT, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
print(f"{len(order)} types, {len(resource_types)} resources, {len(vs_table)} value sets, "
      f"{len(targets_table)} target lists -> {OUT}", file=sys.stderr)
