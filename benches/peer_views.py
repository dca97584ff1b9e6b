"""The view benchmark's peers: one SQL-on-FHIR v2 ViewDefinition over NDJSON.

usage: peer_views.py PEER VIEW.json NDJSON_DIR [--out FILE.csv] [--all-files]
                     [--chunk-size N]

PEER is one of pysof, pysof-bundle, fhir4ds, pathling. It prints one JSON line:
{"peer", "rows", "seconds", "peak_rss_mb", "version"}. "seconds" is the wall
time from the first read of an input file to the last row in the peer's own
result: imports, a JVM's start and writing --out are outside it, except for
pysof, whose own result is the CSV it writes from Rust (to /dev/null without
--out). "peak_rss_mb" is ru_maxrss of this process (the interpreter and the
peer's imports included: about 45 MB for pysof, 165 MB for fhir4ds with
pandas and DuckDB), plus that of the largest reaped child for pathling, whose
work happens in a child JVM. --out writes the rows as CSV: a header of the
view's column names, then one line per row, an empty field for an empty
value (pysof writes its own CSV; the others go through Python's csv module).
Row order is the peer's own: sort before comparing.

Which files are read: a file belongs to the view's resource type when its
name up to the first dot is that type (Patient.ndjson, Patient.000.ndjson,
as a Bulk Data export names them). --all-files reads every *.ndjson in the
directory instead and leaves it to the peer to skip the other types (pysof,
pysof-bundle and fhir4ds do, a Bulk Data log.ndjson included).

The peers, as fed here:

pysof (PyPI pysof, the Python binding of Helios's Rust `sof` crate). Fed
  NDJSON natively: pysof.process_ndjson_to_file(view_json, path, dest, "csv",
  chunk_size=N) per file, which reads, evaluates and writes CSV chunk by
  chunk of N resources (default 1000) in Rust and returns {"output_rows":
  ...}; dest is /dev/null without --out. It skips lines of other resource
  types itself. Its wheels (0.1.47, 0.2.0, 0.2.5 and 0.2.6 looked
  at, all tagged manylinux_2_34) bundle an OpenSSL 3.4 libcrypto that needs
  glibc 2.38 (__isoc23_strtol), so on Debian 12 (glibc 2.36) `import pysof` fails with
  "version `GLIBC_2.38' not found (required by .../libcrypto-6c77eaa9.so.3)"
  and pysof silently installs placeholder functions. The extension itself
  needs only glibc 2.34 and OpenSSL 3.0 symbols (OPENSSL_3.0.0), so when that
  happens this script copies the package to a temporary folder, points the
  two bundled OpenSSL file names at the system's libcrypto.so.3 and
  libssl.so.3, and imports that copy; the installed venv is left as it is.
  OpenSSL is only pysof's TLS client (SSL_connect and the like: fetching
  over https, as remote resolve() does), which these runs never use.
pysof-bundle: the same library fed FHIR Bundles instead:
  pysof.run_view_definition(view_json, bundle_json, "csv") per Bundle of N
  NDJSON lines (type collection, built as JSON text from the lines, so no
  Python objects are made), the CSV rows parsed back to count them.
fhir4ds (PyPI fhir4ds 0.5.1, SQL generated for DuckDB). Its file loaders do
  not keep NDJSON as it is: load_from_files json.load()s the whole file,
  which fails on a second line, and load_from_json_file goes through
  read_json's schema inference and to_json, which writes every element a
  resource lacks as null and the numbers of a mixed column as doubles, so a
  forEach then makes a row for each Observation without a component
  (158,500 rows instead of 16,600 on 100 copies of the pathling-r4
  Observations) and 60 comes out as 60.0. So the lines go unchanged into its
  resource table (fhir_resources.resource JSON) with DuckDB's
  read_ndjson_objects on its own connection, then
  FHIRDataStore.view_runner().execute_view_definition(view).fetchall(). Its
  DuckDBDialect runs "INSTALL json; LOAD json;" on connect, and DuckDB 2.0
  tries to download the statically linked json extension on INSTALL (no
  network here): the connection is wrapped so that only LOAD runs. DuckDB
  uses both cores.
  Not supported by fhir4ds 0.5.1 (it compiles FHIRPath to JSON paths and
  gets these silently wrong, NULL or JSON text instead of an error):
  first() and ofType() inside a forEach (code.coding.first().code and
  value.ofType(Quantity).value give NULL; code.coding[0].code and
  valueQuantity.value work); name.given.first() gives name[0].given as a
  JSON array; name.where(use = 'official').family.first() gives NULL;
  name.family.first() reads name[0].family only. getResourceKey() gives
  "Patient/<id>" where pysof gives "<id>" (the spec leaves the key opaque).
pathling (PyPI pathling 10.0.0 with pyspark 4.0.5, Java 17). Fed the
  selected files as text (spark.read.text), pc.encode(df, resource),
  pc.read.datasets({resource: df}).view(json=view_json).collect(), Spark
  local[2]. It cannot run on this project's machines: the wheel ships no
  jars, and PathlingContext.create() makes Spark resolve
  au.csiro.pathling:library-runtime:10.0.0 and
  io.delta:delta-spark_2.13:4.0.1 from Maven Central through Ivy at start,
  which fails ("Host repo1.maven.org not found" ... "unresolved dependency:
  au.csiro.pathling#library-runtime;10.0.0: not found", then pyspark's
  "[JAVA_GATEWAY_EXITED] Java gateway process exited before sending its port
  number"); the machines reach only crates.io, PyPI, Debian's and npm's
  registries, and no PyPI package carries these jars (the pathling wheels
  6.4.2, 7.0.0, 9.9.0 and 10.0.0 hold none); Spark itself starts offline. Given the jars (PATHLING_SPARK_JARS=comma-separated local jar
  files: library-runtime, delta-spark_2.13 and delta-storage), it starts
  Spark with spark.jars instead; that path is untested here, since no jar
  could be had. Without them the peer exits with status 2 and says why.
"""
import argparse
import atexit
import csv
import io
import json
import os
import resource
import shutil
import sys
import tempfile
import time

CHUNK = 1000


def select_files(ndjson_dir, resource_type, all_files):
    names = sorted(n for n in os.listdir(ndjson_dir) if n.endswith(".ndjson"))
    if not all_files:
        names = [n for n in names if n.split(".", 1)[0] == resource_type]
    return [os.path.join(ndjson_dir, n) for n in names]


def column_names(view):
    """The view's column names in order (select, nested select, unionAll's first branch)."""
    names = []

    def walk(sel):
        for c in sel.get("column", []):
            names.append(c["name"])
        for s in sel.get("select", []):
            walk(s)
        if sel.get("unionAll"):
            walk(sel["unionAll"][0])

    for s in view.get("select", []):
        walk(s)
    return names


def write_csv(out, header, rows):
    with open(out, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for r in rows:
            w.writerow(
                "" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v
                for v in r
            )


# --- pysof -------------------------------------------------------------------

def _extension_error():
    """Why pysof's Rust extension does not load, or None when it does."""
    try:
        from pysof import _pysof  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


def import_pysof():
    # On a failed extension pysof warns (an ImportWarning, hidden by default)
    # and installs placeholders that raise NotImplementedError when called.
    import pysof

    error = _extension_error()
    if error is None:
        return pysof
    if "GLIBC_2.38" not in error or "libcrypto" not in error:
        sys.exit(f"pysof: its Rust extension does not load: {error}")
    site = os.path.dirname(os.path.dirname(pysof.__file__))
    libs = os.path.join(site, "pysof.libs")
    system = {}
    for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"):
        for lib in ("libcrypto.so.3", "libssl.so.3"):
            if lib not in system and os.path.exists(os.path.join(d, lib)):
                system[lib] = os.path.join(d, lib)
    if len(system) != 2:
        sys.exit(f"pysof: {error}; and no system OpenSSL 3 (libcrypto.so.3, libssl.so.3) to use instead")
    tmp = tempfile.mkdtemp(prefix="pysof-sysssl-")
    atexit.register(shutil.rmtree, tmp, True)
    shutil.copytree(os.path.dirname(pysof.__file__), os.path.join(tmp, "pysof"))
    os.mkdir(os.path.join(tmp, "pysof.libs"))
    for name in os.listdir(libs):
        target = os.path.join(libs, name)
        if name.startswith("libcrypto-"):
            target = system["libcrypto.so.3"]
        elif name.startswith("libssl-"):
            target = system["libssl.so.3"]
        os.symlink(target, os.path.join(tmp, "pysof.libs", name))
    for m in [m for m in sys.modules if m == "pysof" or m.startswith("pysof.")]:
        del sys.modules[m]
    sys.path.insert(0, tmp)
    import pysof

    if _extension_error() is not None:
        sys.exit(f"pysof: its Rust extension does not load, even with the system OpenSSL: {error}")
    return pysof


def run_pysof(view_text, view, files, out, args):
    pysof = import_pysof()
    parts = [f"{out}.part{i}" for i in range(len(files))] if out else [os.devnull] * len(files)
    rows = 0
    t0 = time.perf_counter()
    for path, dest in zip(files, parts):
        stats = pysof.process_ndjson_to_file(view_text, path, dest, "csv", chunk_size=args.chunk_size)
        rows += stats["output_rows"]
    seconds = time.perf_counter() - t0
    if out:
        # Each part starts with the same header line (names hold no newline).
        with open(out, "wb") as f:
            if not parts:
                f.write((",".join(column_names(view)) + "\n").encode())
            for i, p in enumerate(parts):
                with open(p, "rb") as part:
                    header = part.readline()
                    if i == 0:
                        f.write(header)
                    shutil.copyfileobj(part, f)
                os.remove(p)
    return rows, seconds, f"pysof {pysof.__version__}"


def run_pysof_bundle(view_text, view, files, out, args):
    pysof = import_pysof()
    header, kept, rows = None, [], 0

    def evaluate(lines):
        nonlocal header, rows
        bundle = b'{"resourceType":"Bundle","type":"collection","entry":[' + b",".join(
            b'{"resource":' + l + b"}" for l in lines
        ) + b"]}"
        reader = csv.reader(io.StringIO(pysof.run_view_definition(view_text, bundle, "csv").decode()))
        header = next(reader, None) or header
        for r in reader:
            rows += 1
            if out:
                kept.append(r)

    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb") as f:
            lines = []
            for line in f:
                line = line.strip()
                # A Bundle entry must be a resource: drop other JSON lines, as
                # the NDJSON path does (a Bulk Data log.ndjson, say).
                if b'"resourceType"' in line:
                    lines.append(line)
                if len(lines) == args.chunk_size:
                    evaluate(lines)
                    lines = []
            if lines:
                evaluate(lines)
    seconds = time.perf_counter() - t0
    if out:
        write_csv(out, header or column_names(view), kept)
    return rows, seconds, f"pysof {pysof.__version__}"


# --- fhir4ds -----------------------------------------------------------------

class _LoadOnlyConnection:
    """A DuckDB connection on which fhir4ds's "INSTALL json" does not download."""

    def __init__(self, con):
        self._con = con

    def execute(self, sql, *params):
        if sql.strip() == "INSTALL json; LOAD json;":
            return self._con.execute("LOAD json")
        return self._con.execute(sql, *params)

    def __getattr__(self, name):
        return getattr(self._con, name)


def run_fhir4ds(view_text, view, files, out, args):
    import duckdb
    import fhir4ds
    from fhir4ds.datastore import FHIRDataStore
    from fhir4ds.dialects import DuckDBDialect

    con = duckdb.connect()
    store = FHIRDataStore(dialect=DuckDBDialect(connection=_LoadOnlyConnection(con)))
    runner = store.view_runner()
    t0 = time.perf_counter()
    if files:
        con.execute(
            f"INSERT INTO {store.table_name} ({store.json_col}) "
            "SELECT json FROM read_ndjson_objects(?, maximum_object_size = 100000000)",
            [files],
        )
    result = runner.execute_view_definition(view)
    rows = result.fetchall()
    seconds = time.perf_counter() - t0
    if out:
        write_csv(out, [d[0] for d in result.description], rows)
    return len(rows), seconds, f"fhir4ds {fhir4ds.__version__} (duckdb {duckdb.__version__})"


# --- pathling ----------------------------------------------------------------

def run_pathling(view_text, view, files, out, args):
    try:
        import pathling
        import pyspark
    except ImportError as e:
        sys.exit(f"pathling: {e}: install pathling==10.0.0 (it brings pyspark 4.0); "
                 "it needs jars from Maven Central at start as well (see this file's docstring)")
    from pathling import PathlingContext
    from pathling._spark_defaults import DELTA_CATALOG, DELTA_EXTENSION
    from pyspark.sql import SparkSession

    conf = {
        "spark.master": "local[2]",
        "spark.driver.memory": "8g",
        "spark.ui.enabled": "false",
        "spark.sql.shuffle.partitions": "2",
    }
    jars = os.environ.get("PATHLING_SPARK_JARS")
    try:
        if jars:
            builder = SparkSession.builder
            for k, v in {**conf, "spark.jars": jars, "spark.sql.extensions": DELTA_EXTENSION,
                         "spark.sql.catalog.spark_catalog": DELTA_CATALOG}.items():
                builder = builder.config(k, v)
            pc = PathlingContext.create(spark=builder.getOrCreate())
        else:
            pc = PathlingContext.create(spark_conf=conf)
    except Exception as e:  # pyspark raises PySparkRuntimeError JAVA_GATEWAY_EXITED
        from pathling._version import __delta_version__, __java_version__

        first = (str(e).strip().splitlines() or [""])[0]
        if jars:
            why = f"with the jars of PATHLING_SPARK_JARS ({jars})"
        else:
            why = (
                f"PathlingContext.create() has Spark fetch au.csiro.pathling:library-runtime:"
                f"{__java_version__} and io.delta:delta-spark_2.13:{__delta_version__} from Maven "
                "Central at start (the Ivy report above), which this machine cannot reach, and the "
                "pathling wheel ships no jars. Set PATHLING_SPARK_JARS to local copies of "
                "library-runtime, delta-spark_2.13 and delta-storage to run it"
            )
        print(f"pathling: did not start ({type(e).__name__}: {first}): {why}.", file=sys.stderr)
        sys.exit(2)
    spark = pc.spark
    t0 = time.perf_counter()
    text = spark.read.text(files) if files else spark.createDataFrame([], "value string")
    encoded = pc.encode(text, view["resource"])
    df = pc.read.datasets({view["resource"]: encoded}).view(json=view_text.decode())
    rows = df.collect()
    seconds = time.perf_counter() - t0
    header = df.columns
    spark.stop()
    # End the JVM and reap it, so that RUSAGE_CHILDREN holds its peak.
    from pyspark import SparkContext

    gateway = SparkContext._gateway
    if gateway is not None:
        gateway.shutdown()
        proc = getattr(gateway, "proc", None)
        if proc is not None:
            proc.stdin.close()
            proc.wait(timeout=60)
    if out:
        write_csv(out, header, (tuple(r) for r in rows))
    from importlib.metadata import version

    return len(rows), seconds, f"pathling {version('pathling')} (pyspark {pyspark.__version__})"


PEERS = {
    "pysof": run_pysof,
    "pysof-bundle": run_pysof_bundle,
    "fhir4ds": run_fhir4ds,
    "pathling": run_pathling,
}


def main():
    p = argparse.ArgumentParser(description="Run one SQL-on-FHIR v2 ViewDefinition with a peer.")
    p.add_argument("peer", choices=sorted(PEERS))
    p.add_argument("view", help="ViewDefinition JSON file")
    p.add_argument("ndjson_dir", help="directory of FHIR NDJSON files")
    p.add_argument("--out", help="write the rows as CSV to this file")
    p.add_argument("--all-files", action="store_true",
                   help="read every *.ndjson, not only those named for the view's resource type")
    p.add_argument("--chunk-size", type=int, default=CHUNK,
                   help="resources per chunk or Bundle for pysof (default %(default)s)")
    args = p.parse_args()
    with open(args.view, "rb") as f:
        view_text = f.read()
    view = json.loads(view_text)
    files = select_files(args.ndjson_dir, view["resource"], args.all_files)
    rows, seconds, version = PEERS[args.peer](view_text, view, files, args.out, args)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.peer == "pathling":
        rss += resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({
        "peer": args.peer,
        "rows": rows,
        "seconds": round(seconds, 4),
        "peak_rss_mb": round(rss / 1024, 1),
        "version": version,
    }))


if __name__ == "__main__":
    main()
