#!/usr/bin/env python3
"""Checks deploy/cloudformation.yaml and deploy/state-machine.asl.json.

    .venv/bin/python tests/deploy/check.py --endpoint http://127.0.0.1:PORT

against a running `moto_server -H 127.0.0.1 -p PORT`:

1. cfn-lint on the template (fails on errors), and on the state machine
   definition (cfn-lint validates a `Definition` object, not a substituted
   DefinitionString, so the ASL goes into a scratch template of its own).
2. Static checks of the ASL (every Next exists, every state reachable; the
   three Distributed Maps, their ItemReader taking the bucket and key from
   the plan's answer; the unit processors; the Lambda events against the
   fields engine/lambda/src/lib.rs accepts; the Batch command) and of the
   template (the bucket settings, Glue names, RetryStrategy evaluated for
   every exit code, the Lambda, the engine's environment variables, the
   alarms' metric names and dimensions against engine/src/emf.rs, the
   import role's buckets, the settings objects on S3 and their conditions).
3. Expands the AWS::LanguageExtensions transform (moto has none) with test
   parameters, leaves out the resource types moto's CloudFormation has no
   model for (printing each, and each reference to one it replaces with a
   placeholder), creates the stack in moto and waits for CREATE_COMPLETE.
4. Reads back through the service APIs: S3 encryption, the Glue databases
   (created by check.py from the template's DatabaseInput), every IAM role's
   trust, inline and managed policies against the template, the Lambda
   function, the Batch job definition and queue, the EventBridge rule, and
   the state machine's definition (the ASL file with the values read from
   each service substituted).
5. With the fhirflow binary (target/debug/fhirflow): the binary serves as the
   deployed function (started as its `bootstrap`, with the environment read
   back from moto, against a stand-in of the Lambda Runtime API), on the
   stack's buckets in moto, with FHIRFLOW_CONFIG and [fleet] tenants as S3
   objects.
6. moto's Step Functions execution mode (LocalStack's interpreter), with
   moto's Docker-less Lambda answering from a queue: routing fragments, the
   unit processors, and whole executions (one tenant, an extraction landed,
   nightly) whose Lambda answers are the binary's answers to the events the
   state machine sends, in order.

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


def engine_events() -> dict[str, set[str]] | None:
    """The Lambda events engine/lambda/src/lib.rs accepts: {"work": its fields,
    "plan": ..., "catalog-sync": ...} (the commands are `deny_unknown_fields`)."""
    lib = REPO / "engine" / "lambda" / "src" / "lib.rs"
    if not lib.exists():
        return None
    src = lib.read_text()

    def fields(body: str) -> set[str]:
        return set(re.findall(r"^\s*(?:pub )?(\w+):", body, re.M))

    out = {}
    work = re.search(r"pub struct WorkEvent \{(.*?)\n\}", src, re.S)
    if work:
        out["work"] = fields(work.group(1))
    enum = re.search(r"pub enum CommandEvent \{(.*?)\n\}", src, re.S)
    if enum:
        for name, body in re.findall(r"^    (\w+)(?: \{(.*?)^    \})?,", enum.group(1), re.M | re.S):
            kebab = re.sub(r"(?<!^)([A-Z])", r"-\1", name).lower()
            out[kebab] = {"command"} | fields(body or "")
    return out


def jsonpath(doc, path: str):
    """A `$.a.b` path (the only form the payload templates here use)."""
    if not re.fullmatch(r"\$(\.\w+)*", path):
        raise ValueError(f"not a plain path: {path}")
    for part in path.split(".")[1:]:
        doc = doc.get(part) if isinstance(doc, dict) else None
    return doc


def evaluate(template: dict, inp: dict) -> dict:
    """A Parameters/Payload template whose `.$` values are plain paths, for `inp`."""
    return {k.removesuffix(".$"): (jsonpath(inp, v) if k.endswith(".$") else v) for k, v in template.items()}


def chain(asl: dict, start: str) -> list[str]:
    """The states from `start` following Default (else Next) to the end."""
    out, n = [], start
    while n and n not in out:
        out.append(n)
        st = asl["States"][n]
        n = st.get("Default", st.get("Next"))
    return out


PLAN_SELECTOR = {"uri.$": "$.Payload.plan.uri", "units.$": "$.Payload.units",
                 "bucket.$": "$.Payload.bucket", "key.$": "$.Payload.key"}
STAGES = ("extract", "curate", "import")
BATCH_COMMAND = "States.Array('work', '--plan', $.plan, '--index', States.Format('{}', $.index), '--skipped-ok')"


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

    top = asl["States"]
    resources = {st["Resource"].split(":::")[-1] for _, _, st, _ in asl_states(asl) if st["Type"] == "Task"}
    R.check(resources == {"lambda:invoke", "batch:submitJob.sync", "sns:publish"},
            f"tasks are Lambda invocations, Batch jobs and the SNS notice only (no log reading): {sorted(resources)}")

    # The order: extract -> curate -> import -> catalog sync; the landed extraction skips extract.
    R.check(chain(asl, "PlanExtract") == ["PlanExtract", "HasExtractUnits", "PlanCurate", "HasCurateUnits",
                                          "PlanImport", "HasImportUnits", "CatalogSync", "Done"]
            and all(top[f"Run{s.title()}"]["Next"] == ("CatalogSync" if s == "import" else f"Plan{STAGES[i + 1].title()}")
                    for i, s in enumerate(STAGES)),
            "plan extract -> [map] -> plan curate -> [map] -> plan import -> [map] -> catalog sync -> Done")
    R.check(top["ScopeAll"] == {"Type": "Pass", "Comment": top["ScopeAll"].get("Comment"), "Parameters": {"tenant": None},
                                "Next": "PlanExtract"}
            and top["ScopeTenant"]["Parameters"] == {"tenant.$": "$.tenant"} and top["ScopeTenant"]["Next"] == "PlanExtract"
            and top["TenantFromKey"]["Next"] == "PlanCurate" and set(top["TenantFromKey"]["Parameters"]) == {"tenant.$"},
            "nightly and {tenant} start at PlanExtract with {tenant} (null: all); a landed extraction at PlanCurate")

    maps = {p: st for p, _, st, _ in asl_states(asl) if st["Type"] == "Map"}
    R.check(sorted(maps) == ["RunCurate", "RunExtract", "RunImport"], f"three Distributed Maps: {sorted(maps)}")
    for stage in STAGES:
        path = f"Run{stage.title()}"
        st = maps.get(path)
        if st is None:
            continue
        pc = st["ItemProcessor"].get("ProcessorConfig", {})
        rd = st.get("ItemReader", {})
        R.check(pc.get("Mode") == "DISTRIBUTED", f"{path}: Mode DISTRIBUTED")
        R.check(rd.get("Resource", "").endswith(":states:::s3:getObject")
                and rd.get("ReaderConfig", {}).get("InputType") == "JSONL"
                and rd.get("Parameters") == {"Bucket.$": f"$.{stage}_plan.bucket", "Key.$": f"$.{stage}_plan.key"},
                f"{path}: ItemReader reads the plan as S3 JSON Lines at the bucket and key the plan answered")
        R.check(st.get("ItemSelector") == {"plan.$": f"$.{stage}_plan.uri", "index.$": "$$.Map.Item.Index",
                                           "unit.$": "$$.Map.Item.Value"},
                f"{path}: ItemSelector passes the plan URI, $$.Map.Item.Index and the unit")
        R.check(isinstance(st.get("ToleratedFailurePercentage"), (int, float)),
                f"{path}: ToleratedFailurePercentage {st.get('ToleratedFailurePercentage')}")
        R.check("ResultWriter" in st, f"{path}: ResultWriter (child results go to S3, not the state)")
        R.check([c["Next"] for c in st.get("Catch", [])] == ["NotifyFailure"], f"{path}: a failed map notifies")

        plan = top.get(f"Plan{stage.title()}", {})
        R.check(plan.get("Resource", "").endswith(":states:::lambda:invoke")
                and plan["Parameters"] == {"FunctionName": "${WorkerFunction.Arn}",
                                           "Payload": {"command": "plan", "stage": stage, "tenant.$": "$.tenant"}}
                and plan.get("ResultSelector") == PLAN_SELECTOR and plan.get("ResultPath") == f"$.{stage}_plan"
                and [c["Next"] for c in plan.get("Catch", [])] == ["NotifyFailure"],
                f"Plan{stage.title()}: the function's {{command: plan, stage: {stage}, tenant}} event, "
                "its answer's plan.uri, units, bucket and key")
        has = top.get(f"Has{stage.title()}Units", {})
        R.check(has.get("Choices") == [{"Variable": f"$.{stage}_plan.units", "NumericGreaterThan": 0, "Next": path}],
                f"Has{stage.title()}Units: the map only for a plan with units")

    ext, cur, imp = (maps.get(f"Run{s.title()}", {}).get("ItemProcessor", {}) for s in STAGES)
    R.check(set(ext.get("States", {})) == {"BatchWork"} and ext.get("StartAt") == "BatchWork",
            "extract units run on Batch only (an export outlasts Lambda's 15 minutes)")
    R.check(json.dumps(cur, sort_keys=True) == json.dumps(imp, sort_keys=True), "curate and import run the same unit processor")
    R.check(set(cur.get("States", {})) == {"Runner", "LambdaWork", "BatchWork"},
            f"the processor is Runner -> LambdaWork | BatchWork, nothing else: {sorted(cur.get('States', {}))}")
    runner = cur["States"]["Runner"]
    R.check(runner["Type"] == "Choice"
            and [(c.get("Variable"), c.get("StringEquals"), c.get("Next")) for c in runner["Choices"]]
            == [("$.unit.runner", "batch", "BatchWork")] and runner["Default"] == "LambdaWork",
            "units are routed by their runner field (batch -> Batch, else Lambda)")
    lam = cur["States"]["LambdaWork"]
    R.check(lam["Parameters"] == {"FunctionName": "${WorkerFunction.Arn}", "Payload": {"plan.$": "$.plan", "index.$": "$.index"}},
            "the Lambda unit event is {plan, index}", json.dumps(lam["Parameters"]))
    retried = {e for r in lam.get("Retry", []) for e in r["ErrorEquals"]}
    R.check("Busy" in retried and not retried & {"Failed", "NotConserved", "States.ALL", "States.TaskFailed"},
            "Lambda units retry Busy and Lambda service errors, never Failed or NotConserved", str(sorted(retried)))
    caught = [(set(c["ErrorEquals"]), c["Next"]) for c in lam.get("Catch", [])]
    R.check(caught == [({"Sandbox.Timedout", "Runtime.ExitError", "Lambda.Unknown"}, "BatchWork")],
            "a unit too big for Lambda after all (timeout, out of memory) runs on Batch")
    bat = cur["States"]["BatchWork"]
    R.check(json.dumps(bat, sort_keys=True) == json.dumps(ext.get("States", {}).get("BatchWork"), sort_keys=True),
            "every map runs the same BatchWork")
    cmd = bat["Parameters"]["ContainerOverrides"].get("Command.$", "")
    R.check(cmd == BATCH_COMMAND, "Batch units run `work --plan <uri> --index <N> --skipped-ok`", cmd)
    R.check("Catch" not in bat and bat.get("End") is True,
            "a Batch job that still fails after the retry strategy fails its unit (no exit-code states: --skipped-ok)")

    sync = top.get("CatalogSync", {})
    R.check(sync.get("Resource", "").endswith(":states:::lambda:invoke")
            and sync["Parameters"] == {"FunctionName": "${WorkerFunction.Arn}", "Payload": {"command": "catalog-sync"}}
            and sync.get("Next") == "Done",
            "catalog sync runs last, as the function's {command: catalog-sync} event")

    accepted = engine_events()
    if accepted is None:
        R.note("engine/lambda/src/lib.rs not found: the Lambda events are not compared with the engine")
        return
    for name, st in [(p, s) for p, _, s, _ in asl_states(asl) if s.get("Resource", "").endswith(":states:::lambda:invoke")]:
        keys = {k.removesuffix(".$") for k in st["Parameters"]["Payload"]}
        kind = st["Parameters"]["Payload"].get("command", "work")
        R.check(kind in accepted and keys <= accepted[kind],
                f"{name}: event {sorted(keys)} is one engine/lambda/src/lib.rs accepts ({kind}: {sorted(accepted.get(kind, []))})")


def check_cli(binary: Path | None) -> None:
    """The commands and flags the state machine and the job definition use."""
    R.section("CLI (the fhirflow binary)")
    if binary is None:
        R.note("no fhirflow binary (cargo build -p fhirflow --bins): the CLI and the function are not run")
        return
    for args, want in ((["work", "--help"], ["--plan", "--index", "--skipped-ok"]),
                       (["plan", "--help"], ["--stage", "extract", "curate", "import", "--tenant"]),
                       (["catalog", "sync", "--help"], [])):
        h = subprocess.run([str(binary), *args], capture_output=True, text=True)
        R.check(h.returncode == 0 and all(f in h.stdout for f in want), f"`fhirflow {' '.join(args)}` has {want}")


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
        R.check(False, "engine/src/catalog.rs not found: Glue names not compared with the engine")

    jd = res["WorkerJobDefinition"]["Properties"]
    rules = jd["RetryStrategy"]["EvaluateOnExit"]
    R.check(len(rules) <= 5, f"RetryStrategy has {len(rules)} EvaluateOnExit entries (Batch allows 5)")
    for code, want in EXIT_ACTIONS.items():
        got = next((r["Action"] for r in rules if "OnExitCode" in r and fnmatch.fnmatchcase(str(code), r["OnExitCode"])), None)
        R.check(got == want, f"Batch exit {code} -> {want}", f"the first matching entry says {got}")
    globs = [r["OnExitCode"] for r in rules if "OnExitCode" in r]
    R.check(all(re.fullmatch(r"[0-9]+\*?", g) for g in globs), f"OnExitCode globs are digits with an optional trailing *: {globs}")
    R.check(jd["ContainerProperties"]["Command"] == ["work", "--plan", "Ref::plan", "--skipped-ok"],
            "the job definition's own command (an array job by hand) is `work --plan <plan> --skipped-ok`")

    sm_role = json.dumps(res["StateMachineRole"]["Properties"]["Policies"])
    R.check("logs:FilterLogEvents" not in sm_role and "cloudwatchlogs" not in asl_text,
            "the state machine reads no logs (the plans answer through Lambda): no logs:FilterLogEvents")
    check_settings_objects(tpl)

    fn = res["WorkerFunction"]["Properties"]
    R.check(fn["Runtime"] == "provided.al2023" and fn["Handler"] == "bootstrap"
            and fn["Code"] == {"S3Bucket": {"Ref": "LambdaCodeBucket"}, "S3Key": {"Ref": "LambdaCodeKey"}},
            "Lambda: provided.al2023, handler bootstrap, code from the zip parameters")

    env_names = set(fn["Environment"]["Variables"]) | {e["Name"] for e in jd["ContainerProperties"]["Environment"]}
    main_rs = ENGINE.parent / "cli" / "src" / "main.rs"
    if main_rs.exists():
        engine_env = set(re.findall(r'env = "(FHIRFLOW_[A-Z_]+)"', main_rs.read_text()))
        ours = {n for n in env_names if n.startswith("FHIRFLOW_")}
        R.check(ours <= engine_env, f"the workers' FHIRFLOW_* variables are ones the engine reads: {sorted(ours)}",
                f"not read by the engine: {sorted(ours - engine_env)}")
    else:
        R.check(False, "engine/cli/src/main.rs not found: environment variables not compared with the engine")

    emf_rs = ENGINE / "emf.rs"
    emf_names = set(re.findall(r'\(\s*"([A-Z][A-Za-z]+)",\s*(?:COUNT|BYTES|RATE)', emf_rs.read_text())) if emf_rs.exists() else None
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


def check_settings_objects(tpl: dict) -> None:
    """FHIRFLOW_CONFIG and [fleet] tenants: a file in the package and image, or an S3
    object the worker role may read (and its tenant deny spares)."""
    defaults = {k: v.get("Default") for k, v in tpl["Parameters"].items()}
    defaults["Tenants"] = TENANTS
    for config, tenants, want in (("fhirflow.toml", "", (False, False)),
                                  ("conf/s3-fhirflow.toml", "", (False, False)),
                                  ("s3://cfg-bucket/fhirflow/prod.toml", "s3://cfg-bucket/fhirflow/tenants.toml", (True, True))):
        params = {**defaults, "TenantsConfigFile": config, "FleetTenantsFile": tenants}
        conds = conditions(tpl, params)
        got = (conds["ConfigOnS3"], conds["TenantsFileOnS3"])
        R.check(got == want, f"TenantsConfigFile {config!r}, FleetTenantsFile {tenants!r}: ConfigOnS3, TenantsFileOnS3 {got}")
        arns = {"RawBucket.Arn": "arn:aws:s3:::raw", "CuratedBucket.Arn": "arn:aws:s3:::cur",
                "DataKey.Arn": "arn:aws:kms:k", "WorkerLogGroup.Arn": "arn:aws:logs:g",
                "Datastore.DatastoreArn": "arn:aws:healthlake:d", "ImportRole.Arn": "arn:aws:iam::r"}
        pols = {p["PolicyName"]: p["PolicyDocument"] for p in
                resolved(tpl["Resources"]["WorkerRole"]["Properties"]["Policies"], {"WorkerLogGroup": "g"}, params, arns, conds)}
        spared = statements(pols["only-listed-tenants"])[0]["NotResource"]
        objects = [o.removeprefix("s3://") for o in (config, tenants) if o.startswith("s3://")]
        readable = [s["Resource"] for n in ("config-file", "tenants-file") if n in pols for s in statements(pols[n])]
        R.check(readable == [f"arn:aws:s3:::{o}" for o in objects]
                and [r for r in spared if "tenantGuid=" not in r and not r.endswith(("/metadata/*", "/healthlake-output/*"))]
                == [f"arn:*:s3:::{o}" for o in objects],
                f"  the worker role may read {objects or 'no settings object'} and its deny spares exactly those",
                f"readable {readable}, spared {spared}")
    lake = {s.get("Sid"): s for s in statements(next(p["PolicyDocument"] for p in tpl["Resources"]["WorkerRole"]["Properties"]["Policies"]
                                                     if isinstance(p, dict) and p.get("PolicyName") == "lake"))}
    R.check({"s3:PutObject", "s3:DeleteObject"} <= set(as_list(lake.get("ExtractIntoRaw", {}).get("Action")))
            and lake["ExtractIntoRaw"]["Resource"] == {"Fn::Sub": "${RawBucket.Arn}/raw/*"},
            "the worker role writes raw/* (extract units; the deny keeps it to the listed tenants)")


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


NO_VALUE = object()  # Ref AWS::NoValue: the property or list item is left out


def resolved(value, phys: dict, params: dict, arns: dict, conds: dict | None = None):
    """A template value with Ref, GetAtt, Sub, Join, Split, Select and If resolved against
    the stack (`conds`: the conditions' values, see `conditions`)."""

    def one(node):
        if not isinstance(node, dict) or len(node) != 1:
            return None
        (k, v), = node.items()
        if k == "Ref":
            if v == "AWS::NoValue":
                return NO_VALUE
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
        if k == "Fn::Select":
            return v[1][int(v[0])]
        if k == "Fn::If":
            if conds is None or v[0] not in conds:
                raise KeyError(f"Fn::If on condition {v[0]}: not evaluated")
            return v[1] if conds[v[0]] else v[2]
        return None

    def drop(node):
        if isinstance(node, dict):
            return {k: drop(x) for k, x in node.items() if x is not NO_VALUE}
        if isinstance(node, list):
            return [drop(x) for x in node if x is not NO_VALUE]
        return node

    return drop(walk(copy.deepcopy(value), one))


def conditions(tpl: dict, params: dict) -> dict[str, bool]:
    """The template's Conditions for `params`."""
    defs, out = tpl.get("Conditions", {}), {}

    def ev(node) -> bool:
        (k, v), = node.items()
        if k == "Condition":
            return value(v)
        if k == "Fn::Equals":
            a, b = (resolved(x, {}, params, {}) for x in v)
            return a == b
        if k == "Fn::Not":
            return not ev(v[0])
        if k == "Fn::And":
            return all(ev(x) for x in v)
        if k == "Fn::Or":
            return any(ev(x) for x in v)
        raise ValueError(f"condition function {k}")

    def value(name: str) -> bool:
        if name not in out:
            out[name] = ev(defs[name])
        return out[name]

    for name in defs:
        value(name)
    return out


def read_back(c, tpl: dict, phys: dict, params: dict, asl_text: str, left_out: dict) -> None:
    """`tpl` is the copy moto created, `left_out` the resources it could not."""
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
    for k, v in left_out.items():
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
    conds = conditions(tpl, params)
    for k, v in res.items():
        if v["Type"] != "AWS::IAM::Role":
            continue
        role = phys[k]
        policies = resolved(v["Properties"].get("Policies", []), phys, params, arns, conds)
        inline = iam.list_role_policies(RoleName=role)["PolicyNames"]
        want_inline = [p["PolicyName"] for p in policies]
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
        for pol in policies:
            got = iam.get_role_policy(RoleName=role, PolicyName=pol["PolicyName"])["PolicyDocument"]
            if isinstance(got, str):
                # moto keeps a CloudFormation inline policy as the dict it was given and
                # answers GetRolePolicy with its Python repr.
                got = ast.literal_eval(got)
            want = pol["PolicyDocument"]
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
                if k == "WorkerRole":
                    spared = statements(got)[0]["NotResource"]
                    objects = [params[p].removeprefix("s3://") for p in ("TenantsConfigFile", "FleetTenantsFile")]
                    R.check(all(f"arn:*:s3:::{o}" in spared for o in objects),
                            f"{k}: the settings objects on S3 are spared from the deny: {objects}")
            if pol["PolicyName"] in ("config-file", "tenants-file"):
                param = {"config-file": "TenantsConfigFile", "tenants-file": "FleetTenantsFile"}[pol["PolicyName"]]
                want_arn = "arn:aws:s3:::" + params[param].removeprefix("s3://")
                R.check(statements(got) == [{"Sid": statements(got)[0].get("Sid"), "Effect": "Allow",
                                             "Action": "s3:GetObject", "Resource": want_arn}],
                        f"{k}/{pol['PolicyName']}: s3:GetObject on {want_arn} ({param}) only")

    R.section("read back: Lambda, Batch, EventBridge")
    cfg = lam.get_function(FunctionName=phys["WorkerFunction"])["Configuration"]
    R.check(cfg["Runtime"] == "provided.al2023" and cfg["Handler"] == "bootstrap",
            f"function {cfg['FunctionName']}: {cfg['Runtime']}, handler {cfg['Handler']}")
    fenv = cfg.get("Environment", {}).get("Variables", {})
    R.check(fenv.get("FHIRFLOW_LAKE") == f"s3://{phys['CuratedBucket']}" and fenv.get("FHIRFLOW_RAW_ROOT")
            == f"s3://{phys['RawBucket']}" and fenv.get("FHIRFLOW_ENV") == ENV
            and fenv.get("FHIRFLOW_CONFIG") == params["TenantsConfigFile"],
            "function environment: FHIRFLOW_LAKE, FHIRFLOW_RAW_ROOT, FHIRFLOW_ENV, FHIRFLOW_CONFIG", json.dumps(fenv))
    FUNCTION_ENV.clear()
    FUNCTION_ENV.update(fenv)
    jds = batch.describe_job_definitions(jobDefinitionName=f"fhirflow-{ENV}-work", status="ACTIVE")["jobDefinitions"]
    jd = jds[-1] if jds else {}
    want_rules = res["WorkerJobDefinition"]["Properties"]["RetryStrategy"]["EvaluateOnExit"]
    got_rules = jd.get("retryStrategy", {}).get("evaluateOnExit", [])
    R.check([(r.get("onExitCode"), r.get("action", "").upper()) for r in got_rules]
            == [(r["OnExitCode"], r["Action"]) for r in want_rules],
            f"job definition {jd.get('jobDefinitionName')}: retry strategy {[(r.get('onExitCode'), r.get('action')) for r in got_rules]}")
    R.check(jd.get("containerProperties", {}).get("command") == ["work", "--plan", "Ref::plan", "--skipped-ok"],
            f"job definition command {jd.get('containerProperties', {}).get('command')}")
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
        "CuratedBucket": phys["CuratedBucket"],
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


# --------------------------------------------------------------------------- the binary as the function


FUNCTION_ENV: dict = {}  # the deployed function's environment, read back from moto
DATE = "2026-12-01"


class RuntimeApi:
    """A stand-in of the Lambda Runtime API (2018-06-01) that a custom runtime's
    `bootstrap` polls: `GET /runtime/invocation/next` waits for an event; the function
    posts to `/runtime/invocation/<id>/response` or `/error` (or `/runtime/init/error`)."""

    def __init__(self) -> None:
        import http.server
        import queue
        import threading

        self.events: queue.Queue = queue.Queue()
        self.outcomes: dict = {}
        self.cond = threading.Condition()
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def reply(self, code: int, body: bytes = b"{}", headers=()) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path != "/2018-06-01/runtime/invocation/next":
                    return self.reply(404)
                rid, event = api.events.get()
                self.reply(200, json.dumps(event).encode(), [
                    ("Lambda-Runtime-Aws-Request-Id", rid),
                    ("Lambda-Runtime-Deadline-Ms", str(int(time.time() * 1000) + 900_000)),
                    ("Lambda-Runtime-Invoked-Function-Arn", f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:fhirflow-{ENV}"),
                    ("Lambda-Runtime-Trace-Id", "Root=1-5bef4de7-ad49b0e87f6ef6c87fc2e700")])

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = self.path.split("/")
                if len(parts) == 6 and parts[3] == "invocation" and parts[5] in ("response", "error"):
                    key = parts[4]
                elif self.path == "/2018-06-01/runtime/init/error":
                    key = "init"
                else:
                    return self.reply(404)
                with api.cond:
                    api.outcomes[key] = (parts[5] if key != "init" else "error", json.loads(body or b"null"))
                    api.cond.notify_all()
                self.reply(202)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return "%s:%d" % self.server.server_address[:2]

    def invoke(self, event, timeout: float) -> tuple[str, object]:
        rid = str(uuid.uuid4())
        self.events.put((rid, event))
        with self.cond:
            self.cond.wait_for(lambda: rid in self.outcomes or "init" in self.outcomes, timeout)
        return self.outcomes.get(rid) or self.outcomes.get("init") or ("timeout", None)


class Function:
    """The fhirflow binary as the deployed function: started as its `bootstrap` with the
    function's environment as moto holds it, against a RuntimeApi. `env` adds only what
    reaches moto instead of AWS (test credentials, AWS_ENDPOINT_URL for FHIRFLOW_CONFIG)."""

    def __init__(self, binary: Path, env: dict) -> None:
        self.api = RuntimeApi()
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([str(binary)], stdout=subprocess.DEVNULL, stderr=self.log, env={
            **env, "AWS_LAMBDA_RUNTIME_API": self.api.address, "AWS_LAMBDA_FUNCTION_NAME": f"fhirflow-{ENV}",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "4096", "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/fhirflow/{ENV}/worker", "AWS_LAMBDA_LOG_STREAM_NAME": "check"})

    def invoke(self, event: dict) -> tuple[str, dict]:
        if self.proc.poll() is not None:
            return "exited", {"exit": self.proc.returncode, "log": self.log_tail()}
        kind, body = self.api.invoke(event, timeout=300)
        return kind, body if isinstance(body, dict) else {"body": body}

    def log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-1500:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def cli_env(endpoint: str) -> dict:
    """The deployed function's environment, plus moto's endpoint and test credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FHIRFLOW_", "AWS_"))}
    env.update(FUNCTION_ENV)
    env.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": REGION,
                "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true"})
    return env


def settings_objects(endpoint: str, bucket: str) -> tuple[dict[str, str], dict[str, str]]:
    """FHIRFLOW_CONFIG and its [fleet] tenants as S3 objects of `bucket`: the stack's
    TenantsConfigFile and FleetTenantsFile, and their text. The [s3] and [glue] sections
    only point the engine at moto."""
    config_uri, tenants_uri = f"s3://{bucket}/fhirflow/fhirflow.toml", f"s3://{bucket}/fhirflow/tenants.toml"
    config = "\n".join([
        "[s3]", f'endpoint = "{endpoint}"', f'region = "{REGION}"', "allow_http = true",
        'access_key_id = "testing"', 'secret_access_key = "testing"',
        "[glue]", f'endpoint = "{endpoint}"', f'region = "{REGION}"', f'catalog_id = "{ACCOUNT}"',
        "[fleet]", f'tenants = "{tenants_uri}"', ""])
    tenants = "".join(f'[[tenant]]\ntenant = "{t}"\nsource_system = "ehr"\nfhir_url = "https://fhir.example.org/{i}/"\n\n'
                      for i, t in enumerate(TENANTS))
    return ({"TenantsConfigFile": config_uri, "FleetTenantsFile": tenants_uri},
            {config_uri: config, tenants_uri: tenants})


def check_function(c, phys: dict, binary: Path, endpoint: str) -> Function | None:
    R.section("the fhirflow binary as the deployed function (on the stack's buckets in moto)")
    s3 = c("s3")
    env = cli_env(endpoint)
    sample = REPO / "tests" / "data" / "synthea-10" / "Patient.000.ndjson"
    lines = sample.read_text().splitlines() if sample.exists() else [
        json.dumps({"resourceType": "Patient", "id": f"p{i}"}) for i in range(6)]
    with tempfile.TemporaryDirectory() as tmp:
        for i, tenant in enumerate(TENANTS):
            src = Path(tmp) / f"t{i}"
            src.mkdir()
            (src / "Patient.ndjson").write_text("\n".join(lines[i * 3:i * 3 + 3]) + "\n")
            p = subprocess.run([str(binary), "ingest", str(src), "--tenant", tenant, "--source-system", "ehr",
                                "--date", DATE, "-q"], env=env, capture_output=True, text=True)
            if not R.check(p.returncode == 0, f"`fhirflow ingest` of 3 patients of tenant {tenant} into s3://{phys['RawBucket']}",
                           p.stderr[-600:]):
                return None
    fn = Function(binary, env)
    kind, ans = fn.invoke({"command": "plan", "stage": "extract", "tenant": TENANTS[0]})
    if not R.check(kind == "response" and ans.get("status") == "planned",
                   "the function answers {command: plan, stage: extract, tenant}", f"{kind} {ans}"):
        fn.close()
        return None
    plan = ans.get("plan", {})
    bucket, key = ans.get("bucket"), ans.get("key")
    R.check(bucket == phys["CuratedBucket"] and key == f"metadata/_plans/{plan.get('id')}.jsonl"
            and plan.get("uri") == f"s3://{bucket}/{key}",
            f"the plan is at its answer's bucket and key: s3://{bucket}/{key}", json.dumps(ans))
    selected = {k.removesuffix(".$"): jsonpath({"Payload": ans}, v) for k, v in PLAN_SELECTOR.items()}
    R.check(all(v is not None for v in selected.values()), f"the plan tasks' ResultSelector finds {sorted(selected)}",
            json.dumps(selected))
    units = [json.loads(x) for x in s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode().splitlines()]
    R.check(len(units) == ans.get("units") == 1 and units[0].get("stage") == "extract" and units[0].get("runner") == "batch"
            and units[0].get("tenant") == TENANTS[0] and units[0].get("source_system") == "ehr"
            and units[0].get("fhir_url") == "https://fhir.example.org/0/",
            "FHIRFLOW_CONFIG and its [fleet] tenants read from S3: the tenant's due source is one extract unit "
            "on batch", json.dumps(units))
    kind, ans = fn.invoke({"command": "plan", "stage": "extract", "tenant": None})
    R.check(kind == "response" and ans.get("units") == len(TENANTS), f"tenant null plans every tenant's source: "
            f"{ans.get('units')} units", json.dumps(ans))
    kind, ans = fn.invoke({"command": "plan", "stage": "extract", "tenants": TENANTS[0]})
    R.check(kind == "error", f"an event with a field the engine does not know is refused ({ans.get('errorType')}), "
            "so the state machine's events must match", json.dumps(ans))
    return fn


# --------------------------------------------------------------------------- execution


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


def run(sfn, definition: dict, inp: dict, role: str, wait: float = 20) -> tuple[str, dict, list, str]:
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
    return d["status"], json.loads(d.get("output") or "{}"), history, ex


def scheduled(history: list) -> list[dict]:
    return [json.loads(e["taskScheduledEventDetails"]["parameters"])
            for e in history if e["type"] == "TaskScheduled"]


def entered(history: list) -> list[str]:
    return [e["stateEnteredEventDetails"]["name"] for e in history if "stateEnteredEventDetails" in e]


def failure(history: list) -> dict:
    return next((e.get("taskFailedEventDetails") or e.get("executionFailedEventDetails") for e in history
                 if e["type"] in ("TaskFailed", "ExecutionFailed")), {})


def queue_answers(endpoint: str, answers: list[dict]) -> None:
    """What moto's Docker-less Lambda answers to its next invocations, in order."""
    body = {"results": [json.dumps(a) for a in answers], "region": REGION, "account_id": ACCOUNT}
    req = urllib.request.Request(f"{endpoint}/moto-api/static/lambda-simple/response", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=10).read()


def drain(lam) -> int:
    """Empties moto's queue of Lambda answers (one global FIFO): how many were left.
    An invocation with nothing queued answers its own payload."""
    sentinel = json.dumps({"check.py": uuid.uuid4().hex})
    for n in range(10_000):
        got = lam.invoke(FunctionName=f"fhirflow-{ENV}", Payload=sentinel.encode())["Payload"].read().decode()
        if got == sentinel:
            return n
    return -1


def adapt(definition: dict) -> dict:
    """The copy moto's interpreter takes: no ToleratedFailurePercentage, and each ItemReader
    reads a JSON array copy (check.py writes it beside the plan, `<key>.json`) instead of
    JSON Lines."""

    def fix(node):
        if isinstance(node, dict):
            node.pop("ToleratedFailurePercentage", None)
            if node.get("ReaderConfig", {}).get("InputType") == "JSONL":
                node["ReaderConfig"]["InputType"] = "JSON"
                key = node["Parameters"].pop("Key.$")
                node["Parameters"]["Key.$"] = f"States.Format('{{}}.json', {key})"
        return None

    return walk(copy.deepcopy(definition), fix)


def try_execution(c, endpoint: str, fn: Function | None) -> None:
    """moto's execution mode (its port of LocalStack's ASL interpreter) on the definition."""
    R.section("moto Step Functions execution mode")
    sfn, lam, s3, batch = c("stepfunctions"), c("lambda"), c("s3"), c("batch")
    deployed = sfn.describe_state_machine(
        stateMachineArn=f"arn:aws:states:{REGION}:{ACCOUNT}:stateMachine:fhirflow-{ENV}")
    definition, role = json.loads(deployed["definition"]), deployed["roleArn"]
    fn_name = f"fhirflow-{ENV}"
    queue_arn = batch.describe_job_queues(jobQueues=[fn_name])["jobQueues"][0]["jobQueueArn"]
    jd_arn = batch.describe_job_definitions(jobDefinitionName=f"{fn_name}-work", status="ACTIVE")["jobDefinitions"][-1]["jobDefinitionArn"]
    # The executing backend is another one: the state machines are created in it again.
    # Lambda without Docker answers from a queue (or with the payload it was given).
    moto_config(endpoint, {"stepfunctions": {"execute_state_machine": True}, "lambda": {"use_docker": False}})
    try:
        try:
            sfn.create_state_machine(name=f"fhirflow-{ENV}-as-is", definition=json.dumps(definition), roleArn=role)
            R.note("moto's interpreter accepts the definition as it is")
        except Exception as e:
            R.note(f"moto's interpreter rejects the definition as it is: {str(e)[:200]}")
        adapted = adapt(definition)
        R.note("so moto executes a copy without ToleratedFailurePercentage whose ItemReaders read a JSON array "
               "copy of each plan (<key>.json) instead of its JSON Lines")
        left = drain(lam)
        if left:
            R.note(f"moto's Lambda answer queue held {left} answers of an earlier run: drained")

        # Routing.
        key = f"raw/tenantGuid={TENANTS[0]}/source_system=ehr/_extract/last.json"
        route = fragment(adapted, ["Route", "TenantFromKey", "ScopeTenant", "ScopeAll"])
        for inp, want in ((({"trigger": "extract_landed", "bucket": "b", "key": key}), {"tenant": TENANTS[0], "went_to": "PlanCurate"}),
                          ({"trigger": "nightly"}, {"tenant": None, "went_to": "PlanExtract"}),
                          ({"tenant": TENANTS[1], "other": 1}, {"tenant": TENANTS[1], "went_to": "PlanExtract"}),
                          ({}, {"tenant": None, "went_to": "PlanExtract"})):
            status, out, _, _ = run(sfn, route, inp, role)
            R.check(status == "SUCCEEDED" and out == want, f"input {json.dumps(inp)[:80]} -> {json.dumps(out)}",
                    f"{status}, expected {json.dumps(want)}")

        # One unit of each processor: the Lambda event, the Batch job.
        uri = f"s3://{fn_name}-curated/metadata/_plans/01a24231-dc9e-74d1-bbda-ad03f8e2b47f.jsonl"
        batch_failed = None
        for stage, runner in (("curate", "lambda"), ("curate", "batch"), ("extract", "batch")):
            proc = {k: v for k, v in adapted["States"][f"Run{stage.title()}"]["ItemProcessor"].items() if k != "ProcessorConfig"}
            status, _, history, _ = run(sfn, proc, {"plan": uri, "index": 3, "unit": {"runner": runner, "stage": stage}},
                                        role, wait=10)
            first = (scheduled(history) or [{}])[0]
            if runner == "lambda":
                R.check(first.get("Payload") == {"plan": uri, "index": 3}
                        and first.get("FunctionName", "").endswith(f":function:{fn_name}") and status == "SUCCEEDED",
                        f"{'an' if stage[0] in 'aeiou' else 'a'} {stage} unit on lambda: the function gets {json.dumps(first.get('Payload'))}",
                        f"{status} {json.dumps(first)[:200]}")
            else:
                cmd = first.get("ContainerOverrides", {}).get("Command")
                R.check(cmd == ["work", "--plan", uri, "--index", "3", "--skipped-ok"]
                        and first.get("JobName") == f"fhirflow-{ENV}-{stage}-3"
                        and first.get("JobQueue") == queue_arn and first.get("JobDefinition") == jd_arn,
                        f"{'an' if stage[0] in 'aeiou' else 'a'} {stage} unit on batch: job {first.get('JobName')} `{' '.join(cmd or [])}` on the stack's queue",
                        json.dumps(first)[:300])
                batch_failed = batch_failed or failure(history)
        if batch_failed:
            R.note(f"moto's batch:submitJob.sync fails every job ({batch_failed.get('error')}: "
                   f"{str(batch_failed.get('cause'))[:40]}), so Batch units are checked by the job they submit")

        if fn is None:
            R.note("no fhirflow binary: no whole executions")
            return
        raw = FUNCTION_ENV.get("FHIRFLOW_RAW_ROOT", "s3://raw").removeprefix("s3://")
        curate_plan = whole_run(sfn, lam, s3, adapted, role, fn, endpoint, {"tenant": TENANTS[0]}, "ScopeTenant", TENANTS[0],
                                True, "one tenant")
        if curate_plan:
            kind, again = fn.invoke({"plan": curate_plan, "index": 0})
            R.check(kind == "response" and again.get("status") == "skipped",
                    "the same curate unit again: the function answers status skipped (a success)", json.dumps(again)[:200])
            env = cli_env(endpoint)
            for flags, want in ((["--skipped-ok"], 0), ([], 10)):
                p = subprocess.run([str(fn.proc.args[0]), "work", "--plan", curate_plan, "--index", "0", *flags, "-q"],
                                   env=env, capture_output=True, text=True)
                R.check(p.returncode == want, f"the Batch command on that unit, `{' '.join(['work', '--plan', '…', '--index', '0', *flags])}`, "
                        f"exits {p.returncode}", p.stderr[-300:])
        whole_run(sfn, lam, s3, adapted, role, fn, endpoint, {"trigger": "extract_landed", "bucket": raw, "key": key},
                  "TenantFromKey", TENANTS[0], False, "an extraction landed")
        whole_run(sfn, lam, s3, adapted, role, fn, endpoint, {"trigger": "nightly"}, "ScopeAll", None, True, "nightly")
    finally:
        moto_config(endpoint, {"stepfunctions": {"execute_state_machine": False}, "lambda": {"use_docker": True}})




def whole_run(sfn, lam, s3, adapted: dict, role: str, fn: Function, endpoint: str, inp: dict, scope: str,
              tenant: str | None, with_extract: bool, what: str) -> str | None:
    """One execution whose Lambda answers are the binary's answers to the events the
    state machine sends, in order: the binary is given each event first (from the ASL's
    templates), its answers are queued, then the state machine runs on them and must
    have sent those very events. Returns the curate plan's URI when it had units."""
    R.note(f"whole execution, {what}: input {json.dumps(inp)}")
    answers, events, states, maps, curate_plan = [], [], ["Route", scope], [], None
    for stage in (STAGES if with_extract else STAGES[1:]):
        name = stage.title()
        event = evaluate(adapted["States"][f"Plan{name}"]["Parameters"]["Payload"], {"tenant": tenant})
        kind, ans = fn.invoke(event)
        if not R.check(kind == "response" and ans.get("status") == "planned",
                       f"  {what}: the function plans {stage}: {ans.get('units')} units", f"{kind} {json.dumps(ans)[:300]}"):
            return None
        answers.append(ans)
        events.append(event)
        states += [f"Plan{name}", f"Has{name}Units"]
        if stage == "import" and ans.get("plan", {}).get("left_out"):
            # An S3 lake imports into HealthLake only, which moto lacks; the
            # plan says what it left out rather than listing units that fail.
            R.note(f"  {what}: {ans['plan']['left_out']}")
        if not ans["units"]:
            continue
        states.append(f"Run{name}")
        units = [json.loads(x) for x in s3.get_object(Bucket=ans["bucket"], Key=ans["key"])["Body"].read().decode().splitlines()]
        s3.put_object(Bucket=ans["bucket"], Key=ans["key"] + ".json", Body=json.dumps(units).encode())
        proc = adapted["States"][f"Run{name}"]["ItemProcessor"]["States"]
        on_lambda = [i for i, u in enumerate(units) if "LambdaWork" in proc and u.get("runner") != "batch"]
        maps.append((f"Run{name}", len(units), len(on_lambda)))
        if stage == "curate":
            curate_plan = ans["plan"]["uri"]
        for i in on_lambda:
            ev = evaluate(proc["LambdaWork"]["Parameters"]["Payload"], {"plan": ans["plan"]["uri"], "index": i, "unit": units[i]})
            kind, done = fn.invoke(ev)
            if not R.check(kind == "response" and done.get("status") == "done",
                             f"  {what}: the function runs {stage} unit {i}", f"{kind} {json.dumps(done)[:300]}"):
                return None
            answers.append(done)
    event = evaluate(adapted["States"]["CatalogSync"]["Parameters"]["Payload"], {})
    kind, ans = fn.invoke(event)
    if not R.check(kind == "response" and ans.get("status") == "done",
                   f"  {what}: the function syncs the catalog: {json.dumps(ans.get('catalog'))[:120]}", f"{kind} {ans}"):
        return None
    answers.append(ans)
    events.append(event)
    states += ["CatalogSync", "Done"]

    drain(lam)
    queue_answers(endpoint, answers)
    status, out, history, ex = run(sfn, adapted, inp, role, wait=120)
    left = drain(lam)
    R.check(status == "SUCCEEDED", f"  {what}: the execution succeeds", f"{status} {failure(history)}")
    R.check(entered(history) == states, f"  {what}: {' -> '.join(entered(history))}", f"expected {' -> '.join(states)}")
    sent = [p["Payload"] for p in scheduled(history) if "FunctionName" in p]
    R.check(sent == events, f"  {what}: the state machine sent the function the events the binary answered: "
            + "; ".join(json.dumps(e) for e in sent), f"expected {events}")
    R.check(left == 0, f"  {what}: it took every queued answer (the plans', the Lambda units', catalog sync's)",
            f"{left} left: fewer Lambda invocations than planned")
    runs = sorted(sfn.list_map_runs(executionArn=ex)["mapRuns"], key=lambda m: m["startDate"])
    counts = [sfn.describe_map_run(mapRunArn=m["mapRunArn"])["itemCounts"] for m in runs]
    R.check(len(counts) == len(maps) and all(n["total"] == units and n["succeeded"] >= on_lambda
                                             for n, (_, units, on_lambda) in zip(counts, maps)),
            f"  {what}: each map ran its plan's units, the Lambda ones succeeded: "
            + ", ".join(f"{m} {n['total']} ({n['succeeded']} succeeded, {n['failed']} failed)"
                        for (m, _, _), n in zip(maps, counts)),
            f"expected {maps}, got {counts}")
    R.check(all(out.get(f"{m.removeprefix('Run').lower()}_result", {}).get("ResultWriterDetails") for m, _, _ in maps),
            f"  {what}: each map's results went to S3 (ResultWriter)")
    return curate_plan


# --------------------------------------------------------------------------- main


def main() -> int:
    global TEMPLATE, ASL
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", required=True, help="a running moto server, e.g. http://127.0.0.1:5000")
    ap.add_argument("--stack-name", default=f"fhirflow-check-{uuid.uuid4().hex[:8]}")
    ap.add_argument("--fhirflow", type=Path, default=REPO / "target" / "debug" / "fhirflow",
                    help="the fhirflow binary, run as the function and the CLI (those checks are skipped when absent)")
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
    binary = args.fhirflow.resolve() if args.fhirflow.exists() else None
    check_cli(binary)
    check_template_static(expand_foreach_all(tpl), asl_text)

    c = clients(endpoint)
    R.section(f"moto at {endpoint}")
    try:
        c("sts").get_caller_identity()
    except Exception as e:
        R.fail(f"no moto server at {endpoint}: {e}")
        return finish()
    # CloudFormation creates state machines in moto's default backend, which the API
    # answers from only while execution mode is off; and Lambda functions in the Docker
    # backend (moto's default), which try_execution leaves for the queue while it runs.
    moto_config(endpoint, {"stepfunctions": {"execute_state_machine": False}, "lambda": {"use_docker": True}})
    ec2 = c("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.42.1.0/24")["Subnet"]["SubnetId"]
    code_bucket = f"fhirflow-check-code-{uuid.uuid4().hex[:8]}"
    c("s3").create_bucket(Bucket=code_bucket)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("bootstrap", "#!/bin/sh\necho not the real bootstrap\n")
    c("s3").put_object(Bucket=code_bucket, Key="fhirflow/lambda.zip", Body=zbuf.getvalue())
    # FHIRFLOW_CONFIG and [fleet] tenants as S3 objects (the stack lets the workers read them).
    settings, texts = settings_objects(endpoint, code_bucket)
    for uri, text in texts.items():
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        c("s3").put_object(Bucket=bucket, Key=key, Body=text.encode())
    params = {
        "Environment": ENV, "Tenants": TENANTS, "LambdaCodeBucket": code_bucket,
        "ContainerImage": f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/fhirflow:check",
        "VpcId": vpc, "SubnetIds": [subnet], **settings,
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
    full = expand_foreach(tpl["Resources"], all_params)
    read_back(c, copy_, phys, all_params, asl_text, {k: v for k, v in full.items() if k not in copy_["Resources"]})
    fn = check_function(c, phys, binary, endpoint) if binary else None
    try:
        if not args.no_execution:
            try_execution(c, endpoint, fn)
    finally:
        if fn:
            fn.close()
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
