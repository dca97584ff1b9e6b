#!/usr/bin/env python3
"""Checks deploy/cloudformation.yaml and deploy/state-machine.asl.json.

    .venv/bin/python tests/deploy/check.py --endpoint http://127.0.0.1:PORT

against a running `moto_server -H 127.0.0.1 -p PORT`:

1. cfn-lint on the template (fails on errors), and on the state machine
   definition (cfn-lint validates a `Definition` object, not a substituted
   DefinitionString, so the ASL goes into a scratch template of its own).
2. Static checks of the ASL (every Next exists, every state reachable, the
   unit processors agree, the CLI contract: plan/work commands, the Lambda
   event, the retried error names) and of the template (the bucket settings,
   Glue names, RetryStrategy evaluated for every exit code, the Lambda, the
   engine's environment variables, the alarms' metric names and dimensions
   against engine/src/emf.rs, the import role's buckets). With the fhirflow
   binary (target/debug/fhirflow) the plan document the state machine reads
   is produced by the real binary on a scratch lake.
3. Expands the AWS::LanguageExtensions transform (moto has none) with test
   parameters, leaves out the resource types moto's CloudFormation has no
   model for (printing each, and each reference to one it replaces with a
   placeholder), creates the stack in moto and waits for CREATE_COMPLETE.
4. Reads back through the service APIs: S3 encryption (moto's S3 model
   applies no versioning, public access block or notification settings:
   reported, and checked in the template by step 2); the Glue databases
   (moto has no AWS::Glue::Database: check.py creates them from the
   template's DatabaseInput); every IAM role's trust, inline and managed
   policies against the template (moto attaches no ManagedPolicyArns:
   reported); the import role's documents name only the curated bucket;
   the Lambda function, the Batch job definition and queue, the EventBridge
   rule; the state machine's definition, which must equal the ASL file with
   the values read from each service substituted.
5. moto's Step Functions execution mode (LocalStack's interpreter): it
   rejects ToleratedFailurePercentage and JSONL and cannot run Batch .sync
   or Lambda here, so it runs an adapted copy up to the first Batch task
   (routing, tenant from the S3 key, plan commands) and fragments: the plan
   document -> S3 key -> branch, the log-poll give-up, a unit's Lambda event
   and Batch command, a failed Batch job's exit code -> skipped or failed.

Exits 1 on any failure, with the failures listed last.
"""

from __future__ import annotations

import argparse
import ast
import copy
import fnmatch
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "deploy" / "cloudformation.yaml"
ASL = REPO / "deploy" / "state-machine.asl.json"
ENGINE = REPO / "engine" / "src"

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
TENANTS = ["0f8fad5b-d9cb-469f-a165-70867728950e", "7c9e6679-7425-40de-944b-e07fc1f90ae7"]
# Unique per run, so that runs against one moto server do not collide (the
# buckets are retained, their names fixed by the template).
ENV = "chk" + uuid.uuid4().hex[:8]

# `fhirflow work` exit codes and what Batch must do with each (RetryStrategy).
EXIT_ACTIONS = {0: "EXIT", 1: "EXIT", 2: "EXIT", 3: "EXIT", 4: "RETRY", 10: "EXIT"}


# --------------------------------------------------------------------------- report


class Report:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.passed = 0
        self.notes: list[str] = []

    def section(self, title: str) -> None:
        print(f"\n== {title}")

    def ok(self, what: str) -> None:
        self.passed += 1
        print(f"  ok    {what}")

    def fail(self, what: str) -> None:
        self.failures.append(what)
        print(f"  FAIL  {what}")

    def check(self, cond: bool, what: str, why: str = "") -> bool:
        if cond:
            self.ok(what)
        else:
            self.fail(f"{what}{': ' + why if why else ''}")
        return cond

    def note(self, what: str) -> None:
        self.notes.append(what)
        print(f"  note  {what}")


R = Report()


# --------------------------------------------------------------------------- helpers


def cfn_lint_path() -> str:
    beside = Path(sys.executable).with_name("cfn-lint")
    if beside.exists():
        return str(beside)
    found = shutil.which("cfn-lint")
    if not found:
        sys.exit("check.py: cfn-lint is not installed (pip install -r tests/requirements.txt)")
    return found


def run_cfn_lint(path: Path, what: str) -> None:
    """cfn-lint's exit code is a bit mask: 2 errors, 4 warnings, 8 informational."""
    p = subprocess.run([cfn_lint_path(), "--", str(path)], capture_output=True, text=True)
    out = (p.stdout + p.stderr).strip()
    if p.returncode & 2 or p.returncode == 1:
        R.fail(f"cfn-lint {what}: errors\n{out}")
    else:
        R.ok(f"cfn-lint {what}: no errors" + (f" (warnings:\n{out})" if p.returncode & 4 else ""))


def load_template() -> dict:
    from cfnlint.decode import decode

    tpl, matches = decode(str(TEMPLATE))
    if matches or tpl is None:
        sys.exit(f"check.py: cannot parse {TEMPLATE}: {matches}")
    return json.loads(json.dumps(tpl))  # plain dicts, lists and strings


def walk(node, fn):
    """Depth first over every dict and list; fn(node) may return a replacement."""
    if isinstance(node, dict):
        node = {k: walk(v, fn) for k, v in node.items()}
    elif isinstance(node, list):
        node = [walk(v, fn) for v in node]
    out = fn(node)
    return node if out is None else out


def sub_vars(text: str) -> list[str]:
    """The ${...} variables of an Fn::Sub string (${!x} is a literal)."""
    return [v for v in re.findall(r"\$\{([^}]*)\}", text) if not v.startswith("!")]


def statements(doc: dict) -> list[dict]:
    s = doc.get("Statement", [])
    return s if isinstance(s, list) else [s]


def as_list(v):
    return v if isinstance(v, list) else [v]


# --------------------------------------------------------------------------- the ASL


def asl_states(scope: dict, prefix: str = ""):
    """(path, name, state, scope) of every state, nested ones too."""
    for name, st in scope["States"].items():
        yield prefix + name, name, st, scope
        for key in ("ItemProcessor", "Iterator"):
            if key in st:
                yield from asl_states(st[key], f"{prefix}{name}/")
        for i, br in enumerate(st.get("Branches", [])):
            yield from asl_states(br, f"{prefix}{name}[{i}]/")


def successors(st: dict) -> list[str]:
    out = [st["Next"]] if "Next" in st else []
    out += [c["Next"] for c in st.get("Choices", [])]
    out += [st["Default"]] if "Default" in st else []
    out += [c["Next"] for c in st.get("Catch", [])]
    return out


def check_asl_structure(asl: dict) -> None:
    R.section("state machine definition: structure")
    problems = []
    scopes = [("", asl)] + [
        (p + "/", st[k]) for p, _, st, _ in asl_states(asl) for k in ("ItemProcessor",) if k in st
    ]
    for prefix, scope in scopes:
        names = set(scope["States"])
        if scope["StartAt"] not in names:
            problems.append(f"{prefix}StartAt {scope['StartAt']} is not a state")
        seen, todo = set(), [scope["StartAt"]]
        while todo:
            n = todo.pop()
            if n in seen or n not in names:
                continue
            seen.add(n)
            st = scope["States"][n]
            for nxt in successors(st):
                if nxt not in names:
                    problems.append(f"{prefix}{n} goes to {nxt}, which is not a state of its scope")
                todo.append(nxt)
            terminal = st["Type"] in ("Succeed", "Fail") or st.get("End") is True
            if not terminal and not successors(st):
                problems.append(f"{prefix}{n} neither ends nor goes anywhere")
        for n in names - seen:
            problems.append(f"{prefix}{n} is unreachable")
    R.check(not problems, "every Next/Default/Catch target exists, every state is reachable, every path ends",
            "; ".join(problems))

    maps = [(p, st) for p, _, st, _ in asl_states(asl) if st["Type"] == "Map"]
    R.check(len(maps) == 2, f"two Distributed Maps (curate, import): {[p for p, _ in maps]}")
    procs = [json.dumps(st["ItemProcessor"], sort_keys=True) for _, st in maps]
    R.check(len(set(procs)) == 1, "the Maps run the same unit processor")
    for path, st in maps:
        pc = st["ItemProcessor"].get("ProcessorConfig", {})
        rd = st.get("ItemReader", {})
        sel = st.get("ItemSelector", {})
        R.check(pc.get("Mode") == "DISTRIBUTED", f"{path}: Mode DISTRIBUTED")
        R.check(rd.get("Resource", "").endswith(":states:::s3:getObject")
                and rd.get("ReaderConfig", {}).get("InputType") == "JSONL",
                f"{path}: ItemReader reads the plan as S3 JSON Lines")
        R.check(sel.get("index.$") == "$$.Map.Item.Index" and sel.get("unit.$") == "$$.Map.Item.Value"
                and sel.get("plan.$", "").endswith("_plan.uri"),
                f"{path}: ItemSelector passes the plan URI, $$.Map.Item.Index and the unit")
        R.check(isinstance(st.get("ToleratedFailurePercentage"), (int, float)),
                f"{path}: ToleratedFailurePercentage {st.get('ToleratedFailurePercentage')}")
        R.check("ResultWriter" in st, f"{path}: ResultWriter (child results go to S3, not the state)")

    proc = maps[0][1]["ItemProcessor"]["States"]
    runner = proc[maps[0][1]["ItemProcessor"]["StartAt"]]
    R.check(runner["Type"] == "Choice"
            and [(c.get("Variable"), c.get("StringEquals")) for c in runner["Choices"]] == [("$.unit.runner", "batch")],
            "units are routed by their runner field (batch -> Batch, else Lambda)")
    lam = next(s for s in proc.values() if s.get("Resource", "").endswith(":states:::lambda:invoke"))
    R.check(lam["Parameters"]["Payload"] == {"plan.$": "$.plan", "index.$": "$.index"},
            "the Lambda event is {plan, index}", json.dumps(lam["Parameters"]["Payload"]))
    retried = {e for r in lam.get("Retry", []) for e in r["ErrorEquals"]}
    R.check("Busy" in retried and not retried & {"Failed", "NotConserved", "States.ALL", "States.TaskFailed"},
            "Lambda units retry Busy and Lambda service errors, never Failed or NotConserved",
            str(sorted(retried)))
    bat = next(s for s in proc.values() if s.get("Resource", "").endswith(":states:::batch:submitJob.sync"))
    cmd = bat["Parameters"]["ContainerOverrides"].get("Command.$", "")
    R.check(cmd == "States.Array('work', '--plan', $.plan, '--index', States.Format('{}', $.index))",
            "Batch units run `work --plan <uri> --index <N>`", cmd)

    plans = {p: st for p, _, st, _ in asl_states(asl) if p.startswith("Plan") and st["Type"] == "Task"}
    R.check(set(plans) == {"PlanCurate", "PlanImport"}, f"plan steps {sorted(plans)}")
    scope_all = asl["States"]["ScopeAll"]["Parameters"]["commands"]
    scope_tenant = asl["States"]["ScopeTenant"]["Parameters"]["commands"]
    for stage in ("curate", "import"):
        R.check(scope_all[stage] == ["plan", "--stage", stage, "--output", "json"],
                f"nightly: `plan --stage {stage} --output json`")
        R.check(scope_tenant[f"{stage}.$"]
                == f"States.Array('plan', '--stage', '{stage}', '--tenant', $.tenant, '--output', 'json')",
                f"one tenant: `plan --stage {stage} --tenant <guid> --output json`")
    sync = asl["States"]["CatalogSync"]["Parameters"]["ContainerOverrides"]["Command"]
    R.check(sync == ["catalog", "sync"], "catalog sync runs last: `catalog sync`")


def check_cli_contract(asl: dict, binary: Path | None) -> None:
    """What the state machine reads from `plan --output json`, from the real binary."""
    R.section("CLI contract (the fhirflow binary)")
    if binary is None:
        R.note("no fhirflow binary (cargo build -p fhirflow --bins): the plan document's shape is not checked")
        return
    pattern = asl["States"]["ReadCuratePlan"]["Parameters"]["FilterPattern"]
    key_expr = asl["States"]["CuratePlanKey"]["Parameters"]
    with tempfile.TemporaryDirectory() as tmp:
        lake = Path(tmp) / "lake"
        src = Path(tmp) / "in"
        src.mkdir()
        (src / "Patient.ndjson").write_text('{"resourceType":"Patient","id":"p1"}\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRFLOW_")}
        env["FHIRFLOW_LAKE"] = str(lake)
        subprocess.run([str(binary), "ingest", str(src), "--tenant", TENANTS[0], "--source-system", "ehr",
                        "--date", "2026-12-01", "-q"], env=env, check=True, capture_output=True)
        p = subprocess.run([str(binary), *asl["States"]["ScopeAll"]["Parameters"]["commands"]["curate"]],
                           env=env, capture_output=True, text=True)
        lines = [line for line in p.stdout.splitlines() if line.strip()]
        try:
            doc = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            R.fail(f"`plan --stage curate --output json` printed no JSON document: {p.stdout!r} {p.stderr!r}")
            return
        R.check(p.returncode == 0 and len(lines) == 1, "plan --output json prints exactly one line, exit 0")
        R.check(doc.get("command") == "plan" and doc.get("ok") is True,
                f"the document matches the state machine's log filter {pattern}")
        plan = doc.get("plan", {})
        PLAN_DOCUMENT.update(doc)
        R.check({"id", "uri", "units", "bytes"} <= set(plan), f"the document has plan.id/uri/units/bytes: {plan}")
        R.check("$.id" in key_expr["key.$"] and plan.get("uri", "").endswith(f"metadata/_plans/{plan.get('id')}.jsonl"),
                "the plan's key is metadata/_plans/<id>.jsonl under FHIRFLOW_LAKE (the state machine builds it so)")
        unit = json.loads((lake / "metadata" / "_plans" / f"{plan['id']}.jsonl").read_text().splitlines()[0])
        R.check(unit.get("runner") in ("lambda", "batch") and unit.get("stage") == "curate",
                f"a plan line has stage and runner: {unit}")
        for args, flags in ((["work", "--help"], ["--plan", "--index"]), (["catalog", "sync", "--help"], [])):
            h = subprocess.run([str(binary), *args], env=env, capture_output=True, text=True)
            R.check(h.returncode == 0 and all(f in h.stdout for f in flags), f"`fhirflow {' '.join(args)}` {flags}")


# --------------------------------------------------------------------------- the template, statically


def check_template_static(tpl: dict, asl_text: str) -> None:
    res = tpl["Resources"]
    R.section("template: static checks")

    sm = res["StateMachine"]["Properties"]
    embedded = sm.get("DefinitionString", {}).get("Fn::Sub")
    R.check(isinstance(embedded, str) and embedded.strip() == asl_text.strip(),
            "StateMachine.DefinitionString is Fn::Sub of deploy/state-machine.asl.json, verbatim",
            "they differ: re-embed the ASL file (indented 8 spaces under `DefinitionString: !Sub |`)")
    known = set(tpl.get("Parameters", {})) | {"AWS::Partition", "AWS::Region", "AWS::AccountId", "AWS::StackName"}
    known |= set(res)
    unknown = [v for v in sub_vars(asl_text) if v.split(".")[0] not in known]
    R.check(not unknown, "every ${...} of the ASL names a parameter, resource or pseudo parameter", str(unknown))

    for name in ("RawBucket", "CuratedBucket"):
        p = res[name]["Properties"]
        sse = p["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
        R.check(sse["SSEAlgorithm"] == "aws:kms" and sse.get("KMSMasterKeyID") == {"Fn::GetAtt": ["DataKey", "Arn"]},
                f"{name}: SSE-KMS with DataKey")
        R.check(p["VersioningConfiguration"]["Status"] == "Enabled", f"{name}: versioning")
        pab = p["PublicAccessBlockConfiguration"]
        R.check(all(pab.get(k) is True for k in
                    ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets")),
                f"{name}: public access blocked")
        R.check(p["NotificationConfiguration"]["EventBridgeConfiguration"]["EventBridgeEnabled"] is True,
                f"{name}: EventBridge notifications")

    names = {res[d]["Properties"]["DatabaseInput"]["Name"] if isinstance(res[d]["Properties"]["DatabaseInput"]["Name"], str)
             else res[d]["Properties"]["DatabaseInput"]["Name"].get("Fn::Sub")
             for d in res if res[d]["Type"] == "AWS::Glue::Database"}
    catalog_rs = ENGINE / "catalog.rs"
    if catalog_rs.exists():
        src = catalog_rs.read_text()
        want = set(re.findall(r'pub const (?:RAW|CURATED)_DATABASE: &str = "([^"]+)"', src))
        want |= {m.replace("{env}", "${Environment}") for m in re.findall(r'format!\("(fhir_import_metadata_\{env\})"\)', src)}
        R.check(names == want, f"Glue databases are the engine's: {sorted(names)}", f"engine: {sorted(want)}")
    else:
        R.note("engine/src/catalog.rs not found: Glue names not compared with the engine")

    jd = res["WorkerJobDefinition"]["Properties"]
    rules = jd["RetryStrategy"]["EvaluateOnExit"]
    R.check(len(rules) <= 5, f"RetryStrategy has {len(rules)} EvaluateOnExit entries (Batch allows 5)")
    for code, want in EXIT_ACTIONS.items():
        got = next((r["Action"] for r in rules if "OnExitCode" in r and fnmatch.fnmatchcase(str(code), r["OnExitCode"])), None)
        R.check(got == want, f"Batch exit {code} -> {want}", f"the first matching entry says {got}")
    globs = [r["OnExitCode"] for r in rules if "OnExitCode" in r]
    R.check(all(re.fullmatch(r"[0-9]+\*?", g) for g in globs), f"OnExitCode globs are digits with an optional trailing *: {globs}")

    fn = res["WorkerFunction"]["Properties"]
    R.check(fn["Runtime"] == "provided.al2023" and fn["Handler"] == "bootstrap"
            and fn["Code"] == {"S3Bucket": {"Ref": "LambdaCodeBucket"}, "S3Key": {"Ref": "LambdaCodeKey"}},
            "Lambda: provided.al2023, handler bootstrap, code from the zip parameters")

    env_names = set(fn["Environment"]["Variables"]) | {e["Name"] for e in jd["ContainerProperties"]["Environment"]}
    main_rs = ENGINE / "main.rs"
    if main_rs.exists():
        engine_env = set(re.findall(r'env = "(FHIRFLOW_[A-Z_]+)"', main_rs.read_text()))
        ours = {n for n in env_names if n.startswith("FHIRFLOW_")}
        R.check(ours <= engine_env, f"the workers' FHIRFLOW_* variables are ones the engine reads: {sorted(ours)}",
                f"not read by the engine: {sorted(ours - engine_env)}")
    else:
        R.note("engine/src/main.rs not found: environment variables not compared with the engine")

    emf_rs = ENGINE / "emf.rs"
    emf_names = set(re.findall(r'\("([A-Z][A-Za-z]+)", (?:COUNT|BYTES|RATE)', emf_rs.read_text())) if emf_rs.exists() else None
    alarms = {k: v["Properties"] for k, v in res.items() if v["Type"] == "AWS::CloudWatch::Alarm"}
    for k, p in alarms.items():
        metrics = []
        if "MetricName" in p:
            metrics.append((p.get("Namespace"), p["MetricName"], [d["Name"] for d in p.get("Dimensions", [])]))
        for m in p.get("Metrics", []):
            if "MetricStat" in m:
                mm = m["MetricStat"]["Metric"]
                metrics.append((mm["Namespace"], mm["MetricName"], [d["Name"] for d in mm.get("Dimensions", [])]))
            elif m.get("Expression", "").upper().startswith("SELECT"):
                q = re.fullmatch(r'SELECT SUM\((\w+)\) FROM SCHEMA\("fhirflow", stage, tenant\)( WHERE .*)?', m["Expression"])
                R.check(q is not None, f"{k}: Metrics Insights query over SCHEMA(\"fhirflow\", stage, tenant)", m["Expression"])
                if q:
                    metrics.append(("fhirflow", q.group(1), ["stage", "tenant"]))
                R.check(m.get("Period", 0) * p.get("EvaluationPeriods", 1) <= 3 * 3600,
                        f"{k}: Metrics Insights alarm evaluates at most 3 hours")
        for ns, name, dims in metrics:
            if ns != "fhirflow":
                continue
            if emf_names is not None:
                R.check(name in emf_names, f"{k}: metric {name} is one engine/src/emf.rs emits")
            R.check(dims == ["stage", "tenant"], f"{k}: {name} with dimensions [stage, tenant] (an EMF dimension set)",
                    str(dims))
    stale = [k for k in alarms if k.startswith("CurateStale")]
    R.check(len(stale) == len(TENANTS) and all(alarms[k]["TreatMissingData"] == "breaching"
                                                and alarms[k]["MetricName"] == "CurateSucceeded" for k in stale),
            f"one CurateSucceeded staleness alarm per tenant, missing data breaching: {stale}")
    for want in ("ConservationFailures", "UnitsFailed", "HealthLakeJobsFailed", "RecordsRejected", "CurateSucceeded"):
        R.check(any(want in json.dumps(p) for p in alarms.values()), f"an alarm watches {want}")
    R.check(all(p.get("AlarmActions") == [{"Ref": "AlarmTopic"}] for p in alarms.values()), "every alarm notifies the SNS topic")

    sched = res["NightlyRun"]["Properties"]["Target"]
    R.check(sched["Arn"] == {"Ref": "StateMachine"} and json.loads(sched["Input"]) == {"trigger": "nightly"}
            and res["NightlyRun"]["Properties"]["ScheduleExpression"] == {"Ref": "NightlyScheduleExpression"},
            "the nightly schedule starts the state machine with {\"trigger\": \"nightly\"}")
    rule = res["ExtractLandedRule"]["Properties"]
    tgt = rule["Targets"][0]
    R.check(rule["EventPattern"]["detail-type"] == ["Object Created"] and tgt["Arn"] == {"Ref": "StateMachine"}
            and '"extract_landed"' in tgt["InputTransformer"]["InputTemplate"]
            and tgt["InputTransformer"]["InputPathsMap"]["key"] == "$.detail.object.key",
            "the extract-landed rule starts it with trigger extract_landed and the object key")
    imp = res["ImportRole"]["Properties"]
    s3_resources = [r for pol in imp["Policies"] for s in statements(pol["PolicyDocument"])
                    if any(str(a).startswith("s3:") for a in as_list(s["Action"])) and s["Effect"] == "Allow"
                    for r in as_list(s["Resource"])]
    bad = [r for r in s3_resources if "CuratedBucket" not in json.dumps(r)]
    R.check(not bad and "RawBucket" not in json.dumps(imp), "the import role's S3 statements name only the curated bucket",
            json.dumps(bad))


# --------------------------------------------------------------------------- a copy moto can create


def moto_types() -> set[str]:
    from moto.cloudformation.parsing import get_model_map

    return set(get_model_map())


def expand_foreach(section: dict, params: dict) -> dict:
    """AWS::LanguageExtensions' Fn::ForEach over one template section."""
    out = {}
    for key, val in section.items():
        if not key.startswith("Fn::ForEach::"):
            out[key] = val
            continue
        ident, collection, fragment = val
        if isinstance(collection, dict) and "Ref" in collection:
            collection = params[collection["Ref"]]
        for item in collection:
            alnum = re.sub(r"[^A-Za-z0-9]", "", item)

            def subst(node, ident=ident, item=item):
                if isinstance(node, dict):
                    if node.keys() == {"Ref"} and node["Ref"] == ident:
                        return item
                    if "Fn::Sub" in node:
                        s = node["Fn::Sub"]
                        if isinstance(s, str):
                            return {"Fn::Sub": s.replace("${%s}" % ident, item)}
                        return {"Fn::Sub": [s[0].replace("${%s}" % ident, item), subst(s[1])]}
                    return {k: subst(v) for k, v in node.items()}
                if isinstance(node, list):
                    return [subst(v) for v in node]
                return node

            for k, body in fragment.items():
                name = k.replace("${%s}" % ident, item).replace("&{%s}" % ident, alnum)
                out.update(expand_foreach({name: subst(body)}, params))
    return out


def placeholder(ref: str, attr: str | None) -> str:
    if attr and attr.endswith("Arn"):
        return f"arn:aws:placeholder:{REGION}:{ACCOUNT}:{ref}"
    return f"placeholder-{ref}" + (f"-{attr}" if attr else "")


def moto_copy(tpl: dict, params: dict) -> tuple[dict, list[str], list[str]]:
    """The template with the transform expanded and moto's unknown types left out."""
    t = copy.deepcopy(tpl)
    t.pop("Transform", None)
    for section in ("Resources", "Outputs", "Conditions"):
        if section in t:
            t[section] = expand_foreach(t[section], params)
    supported = moto_types()
    left_out = {k: v["Type"] for k, v in t["Resources"].items() if v["Type"] not in supported}
    for k in left_out:
        del t["Resources"][k]
    replaced: list[str] = []

    def fix(node):
        if isinstance(node, dict):
            if node.keys() == {"Ref"} and node["Ref"] in left_out:
                replaced.append(f"Ref {node['Ref']}")
                return placeholder(node["Ref"], None)
            if node.keys() == {"Fn::GetAtt"}:
                ga = node["Fn::GetAtt"]
                ref, attr = (ga.split(".", 1) if isinstance(ga, str) else ga)
                if ref in left_out:
                    replaced.append(f"GetAtt {ref}.{attr}")
                    return placeholder(ref, attr)
            if "Fn::Sub" in node and node.keys() == {"Fn::Sub"}:
                s = node["Fn::Sub"]
                text, mapping = (s, {}) if isinstance(s, str) else (s[0], dict(s[1]))
                hits = [v for v in sub_vars(text) if v.split(".")[0] in left_out and v not in mapping]
                if hits:
                    for v in hits:
                        ref, _, attr = v.partition(".")
                        mapping[v] = placeholder(ref, attr or None)
                        replaced.append(f"${{{v}}}")
                    return {"Fn::Sub": [text, mapping]}
        return None

    t = walk(t, fix)
    for k, v in t["Resources"].items():
        if "DependsOn" in v:
            deps = [d for d in as_list(v["DependsOn"]) if d not in left_out]
            if deps:
                v["DependsOn"] = deps
            else:
                del v["DependsOn"]
    lines = [f"{k} ({ty}): moto's CloudFormation has no model for {ty}" for k, ty in sorted(left_out.items())]
    return t, lines, sorted(set(replaced))


# --------------------------------------------------------------------------- moto


def moto_config(endpoint: str, body: dict) -> None:
    req = urllib.request.Request(f"{endpoint}/moto-api/config", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=10).read()


def clients(endpoint: str):
    import boto3
    from botocore.config import Config

    s = boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION)
    cfg = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2})
    return lambda name: s.client(name, endpoint_url=endpoint, config=cfg)


def deploy(c, tpl: dict, stack: str, params: dict) -> dict | None:
    """Creates the stack; returns {logical id: physical id} once CREATE_COMPLETE."""
    cfn = c("cloudformation")
    cfn_params = [{"ParameterKey": k, "ParameterValue": ",".join(v) if isinstance(v, list) else str(v)}
                  for k, v in params.items()]
    try:
        cfn.create_stack(StackName=stack, TemplateBody=json.dumps(tpl, separators=(",", ":")),
                         Parameters=cfn_params, Capabilities=["CAPABILITY_NAMED_IAM", "CAPABILITY_AUTO_EXPAND"])
    except Exception as e:
        R.fail(f"CreateStack {stack}: {e}")
        return None
    deadline = time.time() + 120
    while time.time() < deadline:
        st = cfn.describe_stacks(StackName=stack)["Stacks"][0]
        if not st["StackStatus"].endswith("IN_PROGRESS"):
            break
        time.sleep(1)
    status = st["StackStatus"]
    if status != "CREATE_COMPLETE":
        events = cfn.describe_stack_events(StackName=stack)["StackEvents"]
        why = [f"{e['LogicalResourceId']}: {e.get('ResourceStatus')} {e.get('ResourceStatusReason', '')}"
               for e in events if "FAILED" in e.get("ResourceStatus", "")]
        R.fail(f"stack {stack}: {status} {st.get('StackStatusReason', '')} {why}")
        return None
    R.ok(f"stack {stack}: CREATE_COMPLETE")
    resources = cfn.describe_stack_resources(StackName=stack)["StackResources"]
    return {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in resources}


def resolved(value, phys: dict, params: dict, arns: dict):
    """A template value with Ref, GetAtt, Sub, Join and Split resolved against the stack."""

    def one(node):
        if not isinstance(node, dict) or len(node) != 1:
            return None
        (k, v), = node.items()
        if k == "Ref":
            if v in params:
                return params[v]
            return {"AWS::Partition": "aws", "AWS::Region": REGION, "AWS::AccountId": ACCOUNT}.get(v, phys.get(v))
        if k == "Fn::GetAtt":
            ref, attr = v.split(".", 1) if isinstance(v, str) else v
            return arns.get(f"{ref}.{attr}")
        if k == "Fn::Sub":
            text, mapping = (v, {}) if isinstance(v, str) else (v[0], v[1])

            def rep(m):
                name = m.group(1)
                if name.startswith("!"):
                    return "${" + name[1:] + "}"
                if name in mapping:
                    return str(mapping[name])
                if "." in name:
                    return str(arns.get(name))
                return str(one({"Ref": name}))

            return re.sub(r"\$\{([^}]*)\}", rep, text)
        if k == "Fn::Join":
            return v[0].join(str(x) for x in v[1])
        if k == "Fn::Split":
            return v[1].split(v[0])
        return None

    return walk(copy.deepcopy(value), one)


def read_back(c, tpl: dict, phys: dict, params: dict, asl_text: str) -> None:
    res = tpl["Resources"]
    s3, iam, glue = c("s3"), c("iam"), c("glue")
    lam, batch, sfn, events = c("lambda"), c("batch"), c("stepfunctions"), c("events")

    # Not DescribeKey: moto keeps a CloudFormation KeyPolicy as a dict and then fails
    # to evaluate it (a 500); ListKeys does not look at the policy.
    kms_arn = next(k["KeyArn"] for k in c("kms").list_keys()["Keys"]
                   if phys["DataKey"] in (k["KeyId"], k["KeyArn"]))
    fn_arn = lam.get_function(FunctionName=phys["WorkerFunction"])["Configuration"]["FunctionArn"]
    arns = {"DataKey.Arn": kms_arn, "WorkerFunction.Arn": fn_arn}
    for b in ("RawBucket", "CuratedBucket"):
        arns[f"{b}.Arn"] = f"arn:aws:s3:::{phys[b]}"
    for k, v in res.items():
        if v["Type"] == "AWS::IAM::Role":
            arns[f"{k}.Arn"] = iam.get_role(RoleName=phys[k])["Role"]["Arn"]
    # CloudFormation's LogGroup.Arn ends in ":*" (as DescribeLogGroups' arn does);
    # moto's GetAtt leaves it off, so the documents moto stored have it without.
    for lg in ("WorkerLogGroup", "StateMachineLogGroup"):
        group = c("logs").describe_log_groups(logGroupNamePrefix=phys[lg])["logGroups"][0]
        arns[f"{lg}.Arn"] = group["arn"].removesuffix(":*")

    R.section("read back: S3")
    moto_s3_gaps = []
    for b in ("RawBucket", "CuratedBucket"):
        name = phys[b]
        enc = s3.get_bucket_encryption(Bucket=name)["ServerSideEncryptionConfiguration"]["Rules"][0]
        d = enc["ApplyServerSideEncryptionByDefault"]
        R.check(d["SSEAlgorithm"] == "aws:kms" and d.get("KMSMasterKeyID") == kms_arn,
                f"{name}: SSE-KMS with the stack's key", json.dumps(d))
        ver = s3.get_bucket_versioning(Bucket=name).get("Status")
        try:
            pab = s3.get_public_access_block(Bucket=name)["PublicAccessBlockConfiguration"]
        except s3.exceptions.ClientError:
            pab = None
        eb = "EventBridgeConfiguration" in s3.get_bucket_notification_configuration(Bucket=name)
        for what, got, want in (("versioning", ver, "Enabled"), ("public access block", pab and all(pab.values()), True),
                                ("EventBridge notifications", eb, True)):
            if got == want:
                R.ok(f"{name}: {what}")
            elif not got:
                moto_s3_gaps.append(f"{name}: {what}")
            else:
                R.fail(f"{name}: {what} is {got}")
    if moto_s3_gaps:
        R.note("moto's CloudFormation S3 model applies BucketEncryption and Tags only; not applied, so checked in "
               "the template above instead: " + "; ".join(moto_s3_gaps))

    R.section("read back: Glue (created by check.py from the template's DatabaseInput)")
    for k, v in res.items():
        if v["Type"] != "AWS::Glue::Database":
            continue
        want = resolved(v["Properties"]["DatabaseInput"], phys, params, arns)
        try:
            glue.delete_database(Name=want["Name"])  # an earlier run's
        except glue.exceptions.EntityNotFoundException:
            pass
        glue.create_database(DatabaseInput=want)
        got = glue.get_database(Name=want["Name"])["Database"]
        R.check(got["Name"] == want["Name"] and got.get("LocationUri") == want["LocationUri"],
                f"{k}: database {got['Name']} at {got.get('LocationUri')}")

    R.section("read back: IAM")
    for k, v in res.items():
        if v["Type"] != "AWS::IAM::Role":
            continue
        role = phys[k]
        inline = iam.list_role_policies(RoleName=role)["PolicyNames"]
        want_inline = [p["PolicyName"] for p in v["Properties"].get("Policies", [])]
        R.check(sorted(inline) == sorted(want_inline), f"{k}: inline policies {inline}")
        trust = iam.get_role(RoleName=role)["Role"]["AssumeRolePolicyDocument"]
        R.check(trust == resolved(v["Properties"]["AssumeRolePolicyDocument"], phys, params, arns),
                f"{k}: trust policy " + ", ".join(sorted({str(p) for s in statements(trust)
                                                         for p in s["Principal"].values()})))
        attached = [p["PolicyArn"] for p in iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"]]
        want_attached = resolved(v["Properties"].get("ManagedPolicyArns", []), phys, params, arns)
        if sorted(attached) == sorted(want_attached):
            R.ok(f"{k}: managed policies {attached}")
        elif not attached:
            R.note(f"{k}: moto's CloudFormation IAM model does not attach ManagedPolicyArns "
                   f"(the template's: {want_attached})")
        else:
            R.fail(f"{k}: managed policies {attached}, the template's {want_attached}")
        for pol in v["Properties"].get("Policies", []):
            got = iam.get_role_policy(RoleName=role, PolicyName=pol["PolicyName"])["PolicyDocument"]
            if isinstance(got, str):
                # moto keeps a CloudFormation inline policy as the dict it was given and
                # answers GetRolePolicy with its Python repr.
                got = ast.literal_eval(got)
            want = resolved(pol["PolicyDocument"], phys, params, arns)
            R.check(got == want, f"{k}/{pol['PolicyName']}: the document as the template resolves it",
                    first_difference(want, got))
            if k == "ImportRole":
                text = json.dumps(got)
                named = set(re.findall(r"arn:aws:s3:::([a-z0-9.-]+)", text))
                R.check(named <= {phys["CuratedBucket"]} and phys["RawBucket"] not in text,
                        f"ImportRole/{pol['PolicyName']} names only the curated bucket {sorted(named)}")
            if pol["PolicyName"] == "only-listed-tenants":
                text = json.dumps(got)
                R.check(all(f"tenantGuid={t}/*" in text for t in TENANTS),
                        f"{k}: object access limited to the listed tenants' partitions")

    R.section("read back: Lambda, Batch, EventBridge")
    cfg = lam.get_function(FunctionName=phys["WorkerFunction"])["Configuration"]
    R.check(cfg["Runtime"] == "provided.al2023" and cfg["Handler"] == "bootstrap",
            f"function {cfg['FunctionName']}: {cfg['Runtime']}, handler {cfg['Handler']}")
    fenv = cfg.get("Environment", {}).get("Variables", {})
    R.check(fenv.get("FHIRFLOW_LAKE") == f"s3://{phys['CuratedBucket']}" and fenv.get("FHIRFLOW_RAW_ROOT")
            == f"s3://{phys['RawBucket']}" and fenv.get("FHIRFLOW_ENV") == ENV,
            "function environment: FHIRFLOW_LAKE, FHIRFLOW_RAW_ROOT, FHIRFLOW_ENV", json.dumps(fenv))
    jds = batch.describe_job_definitions(jobDefinitionName=f"fhirflow-{ENV}-work", status="ACTIVE")["jobDefinitions"]
    jd = jds[-1] if jds else {}
    want_rules = res["WorkerJobDefinition"]["Properties"]["RetryStrategy"]["EvaluateOnExit"]
    got_rules = jd.get("retryStrategy", {}).get("evaluateOnExit", [])
    R.check([(r.get("onExitCode"), r.get("action", "").upper()) for r in got_rules]
            == [(r["OnExitCode"], r["Action"]) for r in want_rules],
            f"job definition {jd.get('jobDefinitionName')}: retry strategy {[(r.get('onExitCode'), r.get('action')) for r in got_rules]}")
    queues = batch.describe_job_queues(jobQueues=[f"fhirflow-{ENV}"])["jobQueues"]
    R.check(len(queues) == 1, f"job queue fhirflow-{ENV}")
    rule = events.describe_rule(Name=f"fhirflow-{ENV}-extract-landed")
    pattern = json.loads(rule["EventPattern"])
    R.check(pattern["detail"]["object"]["key"] == [{"wildcard": "raw/tenantGuid=*/source_system=*/_extract/last.json"}]
            and pattern["detail-type"] == ["Object Created"] and pattern["detail"]["bucket"]["name"] == [phys["RawBucket"]],
            "rule extract-landed: S3 Object Created of raw/.../_extract/last.json in the raw bucket")
    targets = events.list_targets_by_rule(Rule=f"fhirflow-{ENV}-extract-landed")["Targets"]
    R.check(len(targets) == 1 and targets[0]["Arn"].endswith(f":stateMachine:fhirflow-{ENV}"),
            "its target is the state machine")

    R.section("read back: Step Functions")
    sm_arn = f"arn:aws:states:{REGION}:{ACCOUNT}:stateMachine:fhirflow-{ENV}"
    got = json.loads(sfn.describe_state_machine(stateMachineArn=sm_arn)["definition"])
    queue_arn = queues[0]["jobQueueArn"] if queues else None
    topics = [t["TopicArn"] for t in c("sns").list_topics()["Topics"] if t["TopicArn"].endswith(f":fhirflow-{ENV}-alarms")]
    values = {
        "AWS::Partition": "aws", "Environment": ENV, "WorkerFunction.Arn": fn_arn,
        "WorkerJobQueue": queue_arn, "WorkerJobDefinition": jd.get("jobDefinitionArn"),
        "CuratedBucket": phys["CuratedBucket"], "WorkerLogGroup": phys["WorkerLogGroup"],
        "AlarmTopic": topics[0] if topics else None,
    }
    missing = [k for k in set(sub_vars(asl_text)) if values.get(k) is None]
    R.check(not missing, "every ASL substitution has a value read from its service", str(missing))
    want = json.loads(re.sub(r"\$\{([^}!][^}]*)\}", lambda m: str(values.get(m.group(1))), asl_text))
    R.check(got == want, f"state machine {sm_arn}: its definition is the ASL file with the stack's values",
            first_difference(want, got))


def first_difference(a, b, path="$") -> str:
    if type(a) is not type(b):
        return f"{path}: {json.dumps(a)[:120]} != {json.dumps(b)[:120]}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}.{k} only on one side"
            d = first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return ""
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return ""
    return "" if a == b else f"{path}: {a!r} != {b!r}"


def fragment(scope: dict, names: list[str]) -> dict:
    """A state machine of some states of a scope; a transition out of them ends in a
    Pass state that records where it went ($.went_to)."""
    states = {n: copy.deepcopy(scope["States"][n]) for n in names}
    outs = set()

    def redirect(holder: dict, key: str) -> None:
        if holder.get(key) is not None and holder[key] not in states:
            outs.add(holder[key])
            holder[key] = f"Out{holder[key]}"

    for st in states.values():
        redirect(st, "Next")
        redirect(st, "Default")
        for c in st.get("Choices", []) + st.get("Catch", []):
            redirect(c, "Next")
    for o in outs:
        states[f"Out{o}"] = {"Type": "Pass", "Result": o, "ResultPath": "$.went_to", "End": True}
    return {"StartAt": names[0], "States": states}


def run(sfn, definition: dict, inp: dict, role: str, wait: float = 20) -> tuple[str, dict, list]:
    """Creates and runs a state machine in moto's executing backend; stops it after `wait`
    seconds or at its first failed task."""
    arn = sfn.create_state_machine(name=f"check-{uuid.uuid4().hex[:12]}", definition=json.dumps(definition),
                                   roleArn=role)["stateMachineArn"]
    ex = sfn.start_execution(stateMachineArn=arn, name=uuid.uuid4().hex, input=json.dumps(inp))["executionArn"]
    deadline = time.time() + wait
    while True:
        d = sfn.describe_execution(executionArn=ex)
        history = sfn.get_execution_history(executionArn=ex, maxResults=1000)["events"]
        if d["status"] != "RUNNING" or time.time() > deadline or any(e["type"] == "TaskFailed" for e in history):
            break
        time.sleep(0.2)
    if d["status"] == "RUNNING":
        try:
            sfn.stop_execution(executionArn=ex)
        except Exception:
            pass
    return d["status"], json.loads(d.get("output") or "{}"), history


def scheduled(history: list) -> list[dict]:
    return [json.loads(e["taskScheduledEventDetails"]["parameters"])
            for e in history if e["type"] == "TaskScheduled"]


def entered(history: list) -> list[str]:
    return [e["stateEnteredEventDetails"]["name"] for e in history if "stateEnteredEventDetails" in e]


PLAN_DOCUMENT: dict = {}  # the real binary's, when check_cli_contract ran it


def try_execution(c, endpoint: str) -> None:
    """moto's execution mode (its port of LocalStack's ASL interpreter) on the definition."""
    R.section("moto Step Functions execution mode")
    sfn = c("stepfunctions")
    deployed = sfn.describe_state_machine(
        stateMachineArn=f"arn:aws:states:{REGION}:{ACCOUNT}:stateMachine:fhirflow-{ENV}")
    definition, role = json.loads(deployed["definition"]), deployed["roleArn"]
    # The executing backend is another one: the state machines are created in it again.
    moto_config(endpoint, {"stepfunctions": {"execute_state_machine": True}})
    try:
        try:
            sfn.create_state_machine(name=f"fhirflow-{ENV}-as-is", definition=json.dumps(definition), roleArn=role)
            R.note("moto's interpreter accepts the definition as it is")
        except Exception as e:
            R.note(f"moto's interpreter rejects the definition as it is: {str(e)[:240]}")

        def adapt(node):
            if isinstance(node, dict):
                node.pop("ToleratedFailurePercentage", None)
                if node.get("InputType") == "JSONL":
                    node["InputType"] = "JSON"
            return None

        adapted = walk(copy.deepcopy(definition), adapt)
        R.note("so moto executes a copy without ToleratedFailurePercentage and with the ItemReader's JSONL "
               "read as JSON, and fragments of it (a transition out of a fragment ends it)")

        # The whole flow, up to the first Batch .sync task: the routing and the commands.
        key = f"raw/tenantGuid={TENANTS[0]}/source_system=ehr/_extract/last.json"
        cases = [
            ({"trigger": "extract_landed", "bucket": "b", "key": key},
             ["plan", "--stage", "curate", "--tenant", TENANTS[0], "--output", "json"]),
            ({"trigger": "nightly"}, ["plan", "--stage", "curate", "--output", "json"]),
            ({"tenant": TENANTS[1]}, ["plan", "--stage", "curate", "--tenant", TENANTS[1], "--output", "json"]),
            ({}, ["plan", "--stage", "curate", "--output", "json"]),
        ]
        for i, (inp, want) in enumerate(cases):
            _, _, history = run(sfn, adapted, inp, role)
            tasks = scheduled(history)
            got = tasks[0].get("ContainerOverrides", {}).get("Command") if tasks else None
            R.check(got == want, f"input {json.dumps(inp)[:70]}: {' -> '.join(entered(history)[:4])} submits "
                    f"`{' '.join(got or ['nothing'])}`", f"expected `{' '.join(want)}`")
            failed = next((e["taskFailedEventDetails"] for e in history if e["type"] == "TaskFailed"), None)
            if i == 0:
                R.note("moto's interpreter fails the first batch:submitJob.sync task "
                       f"({failed.get('error')}: {str(failed.get('cause'))[:60]}), so the rest of the flow runs "
                       "as fragments" if failed else "the first Batch task did not fail in moto")

        # The plan document (from the real binary when it ran) -> the plan's S3 key and the branch.
        doc = PLAN_DOCUMENT or {"command": "plan", "exit_code": 0, "exit_reason": "ok", "ok": True, "plan": {
            "bytes": 127, "id": "01a24231-dc9e-74d1-bbda-ad03f8e2b47f", "units": 1,
            "uri": "s3://b/metadata/_plans/01a24231-dc9e-74d1-bbda-ad03f8e2b47f.jsonl"}}
        for units, went in ((doc["plan"]["units"], "RunCurate"), (0, "PlanImport")):
            d = json.loads(json.dumps(doc))
            d["plan"]["units"] = units
            inp = {"curate_plan": {"job_id": "j", "log_stream": "batch/default/t", "tries": 0,
                                   "log": {"found": 1, "events": [{"Message": json.dumps(d)}]}}}
            status, out, history = run(sfn, fragment(adapted, ["ParseCuratePlan", "CuratePlanKey", "HasCurateUnits"]),
                                       inp, role)
            cp = out.get("curate_plan", {})
            R.check(status == "SUCCEEDED" and cp.get("key") == f"metadata/_plans/{d['plan']['id']}.jsonl"
                    and cp.get("uri") == d["plan"]["uri"] and out.get("went_to") == went,
                    f"a plan document with {units} units -> key {cp.get('key')}, then {out.get('went_to')}",
                    f"{status} {out}")
        status, out, _ = run(sfn, fragment(adapted, ["CuratePlanLogged", "CuratePlanMissing"]),
                             {"curate_plan": {"job_id": "j", "log_stream": "s", "tries": 12,
                                              "log": {"found": 0, "events": []}}}, role)
        R.check(out.get("went_to") == "NotifyFailure" and out.get("error", {}).get("Error") == "fhirflow.PlanNotLogged",
                "a plan document still not in the log after 12 tries -> NotifyFailure (fhirflow.PlanNotLogged)",
                f"{status} {out}")

        # One unit: the runner decides; the Lambda event and the Batch command; a Batch failure's exit code.
        proc = next(st for st in adapted["States"].values() if st["Type"] == "Map")["ItemProcessor"]
        proc = {k: v for k, v in proc.items() if k != "ProcessorConfig"}
        uri = doc["plan"]["uri"]
        for runner, want in (("lambda", {"plan": uri, "index": 3}), ("batch", None)):
            _, _, history = run(sfn, proc, {"plan": uri, "index": 3, "unit": {"runner": runner, "stage": "curate"}},
                                role, wait=10)
            tasks = scheduled(history)
            first = tasks[0] if tasks else {}
            if runner == "lambda":
                R.check(first.get("Payload") == want and first.get("FunctionName", "").endswith(f":function:fhirflow-{ENV}"),
                        f"a lambda unit invokes the worker with {json.dumps(first.get('Payload'))}", json.dumps(first)[:200])
                lam_failed = next((e["taskFailedEventDetails"] for e in history if e["type"] == "TaskFailed"), {})
                R.note(f"moto's Lambda invocation of the (fake) bootstrap fails: {lam_failed.get('error')} "
                       f"{str(lam_failed.get('cause'))[:80]}")
            else:
                cmd = first.get("ContainerOverrides", {}).get("Command")
                R.check(cmd == ["work", "--plan", uri, "--index", "3"] and first.get("JobName") == f"fhirflow-{ENV}-curate-3",
                        f"a batch unit submits job {first.get('JobName')} `{' '.join(cmd or [])}`", json.dumps(first)[:200])
        failure_states = ["ReadBatchFailure", "HasExitCode", "WasSkipped", "Skipped", "UnitFailed"]
        for cause, want_status, what in ((json.dumps({"Container": {"ExitCode": 10}}), "SUCCEEDED", "exit 10 (skipped) succeeds"),
                                         (json.dumps({"Container": {"ExitCode": 3}}), "FAILED", "exit 3 fails the unit"),
                                         (json.dumps({"StatusReason": "host gone"}), "FAILED", "no exit code fails the unit")):
            status, _, history = run(sfn, fragment(proc, failure_states), {"failure": {"Cause": cause}}, role)
            R.check(status == want_status, f"a failed Batch job with {cause}: {what}", status)
    finally:
        moto_config(endpoint, {"stepfunctions": {"execute_state_machine": False}})


# --------------------------------------------------------------------------- main


def main() -> int:
    global TEMPLATE, ASL
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", required=True, help="a running moto server, e.g. http://127.0.0.1:5000")
    ap.add_argument("--stack-name", default=f"fhirflow-check-{uuid.uuid4().hex[:8]}")
    ap.add_argument("--fhirflow", type=Path, default=REPO / "target" / "debug" / "fhirflow",
                    help="the fhirflow binary for the CLI contract checks (skipped when absent)")
    ap.add_argument("--no-execution", action="store_true", help="skip trying moto's execution mode")
    ap.add_argument("--keep", action="store_true", help="leave the stack in moto")
    ap.add_argument("--template", type=Path, default=TEMPLATE, help=argparse.SUPPRESS)
    ap.add_argument("--asl", type=Path, default=ASL, help=argparse.SUPPRESS)
    args = ap.parse_args()
    endpoint = args.endpoint.rstrip("/")
    TEMPLATE, ASL = args.template.resolve(), args.asl.resolve()

    asl_text = ASL.read_text()
    asl = json.loads(asl_text)
    tpl = load_template()

    R.section("cfn-lint")
    run_cfn_lint(TEMPLATE, TEMPLATE.name)
    with tempfile.TemporaryDirectory() as tmp:
        sample = re.sub(r"\$\{([^}!][^}]*)\}", lambda m: {
            "AWS::Partition": "aws", "WorkerFunction.Arn": f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:f",
            "WorkerJobQueue": f"arn:aws:batch:{REGION}:{ACCOUNT}:job-queue/q",
            "WorkerJobDefinition": f"arn:aws:batch:{REGION}:{ACCOUNT}:job-definition/d:1",
            "AlarmTopic": f"arn:aws:sns:{REGION}:{ACCOUNT}:t"}.get(m.group(1), "sample"), asl_text)
        scratch = Path(tmp) / "state-machine.json"
        scratch.write_text(json.dumps({"AWSTemplateFormatVersion": "2010-09-09", "Resources": {"StateMachine": {
            "Type": "AWS::StepFunctions::StateMachine",
            "Properties": {"RoleArn": f"arn:aws:iam::{ACCOUNT}:role/r", "Definition": json.loads(sample)}}}}, indent=1))
        run_cfn_lint(scratch, "deploy/state-machine.asl.json (as a Definition)")

    check_asl_structure(asl)
    check_cli_contract(asl, args.fhirflow if args.fhirflow.exists() else None)
    check_template_static(expand_foreach_all(tpl), asl_text)

    c = clients(endpoint)
    R.section(f"moto at {endpoint}")
    try:
        c("sts").get_caller_identity()
    except Exception as e:
        R.fail(f"no moto server at {endpoint}: {e}")
        return finish()
    # CloudFormation creates state machines in moto's default backend, which the API
    # answers from only while execution mode is off.
    moto_config(endpoint, {"stepfunctions": {"execute_state_machine": False}})
    ec2 = c("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.42.1.0/24")["Subnet"]["SubnetId"]
    code_bucket = f"fhirflow-check-code-{uuid.uuid4().hex[:8]}"
    c("s3").create_bucket(Bucket=code_bucket)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("bootstrap", "#!/bin/sh\necho not the real bootstrap\n")
    c("s3").put_object(Bucket=code_bucket, Key="fhirflow/lambda.zip", Body=zbuf.getvalue())
    params = {
        "Environment": ENV, "Tenants": TENANTS, "LambdaCodeBucket": code_bucket,
        "ContainerImage": f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/fhirflow:check",
        "VpcId": vpc, "SubnetIds": [subnet],
    }
    defaults = {k: v.get("Default") for k, v in tpl["Parameters"].items() if "Default" in v}
    all_params = {**defaults, **params}
    copy_, left_out, replaced = moto_copy(tpl, all_params)
    print(f"  {len(tpl['Resources'])} template entries, {len(copy_['Resources']) + len(left_out)} resources after "
          f"Fn::ForEach (the AWS::LanguageExtensions transform, expanded here: moto has none)")
    print(f"  left out of the moto copy ({len(left_out)}):")
    for line in left_out:
        print(f"    - {line}")
    if replaced:
        print(f"  references to those replaced with placeholders: {', '.join(replaced)}")
    R.notes.append(f"moto could not create {len(left_out)} resources (no CloudFormation model): "
                   + ", ".join(sorted({l.split('(')[1].split(')')[0] for l in left_out})))

    phys = deploy(c, copy_, args.stack_name, params)
    if phys is None:
        return finish()
    print(f"  moto created {len(phys)}: " + ", ".join(f"{k}" for k in sorted(phys)))
    read_back(c, copy_, phys, all_params, asl_text)
    if not args.no_execution:
        try_execution(c, endpoint)
    if not args.keep:
        c("cloudformation").delete_stack(StackName=args.stack_name)
        for d in ("external_fhir_raw", "external_fhir_curated", f"fhir_import_metadata_{ENV}"):
            try:
                c("glue").delete_database(Name=d)
            except Exception:
                pass
    return finish()


def expand_foreach_all(tpl: dict) -> dict:
    params = {k: v.get("Default") for k, v in tpl["Parameters"].items()}
    params["Tenants"] = TENANTS
    t = copy.deepcopy(tpl)
    for section in ("Resources", "Outputs", "Conditions"):
        if section in t:
            t[section] = expand_foreach(t[section], params)
    return t


def finish() -> int:
    print(f"\n== summary: {R.passed} checks passed, {len(R.failures)} failed")
    for n in R.notes:
        print(f"  note: {n}")
    for f in R.failures:
        print(f"  FAILED: {f}")
    return 1 if R.failures else 0


if __name__ == "__main__":
    sys.exit(main())
