"""The stack's CloudWatch dashboard and alarms, held against the metrics the functions write.

The functions write their metrics as CloudWatch Embedded Metric Format lines on stdout
(crates/router/src/metrics.rs): namespace `iam-broker`, and exactly one dimension set of one
dimension per record. CloudWatch files each value under that one dimension only, so a dashboard
widget or an alarm finds a metric only when it names the metric with exactly that dimension (a
SEARCH expression: a schema `{"iam-broker",<that dimension>}`). `EMF` is the list the template is
held to; every function here is pure (no AWS call), so it can be tried on its own:

    PYTHONPATH=scripts python -c 'from rehearse_deploy import cloudwatch; ...'
"""

import json
import re

NAMESPACE = "iam-broker"

# BrokerError::code (crates/broker/src/broker.rs)
CODES = frozenset({"MissingAuthorization", "InvalidToken", "AllowanceRevoked",
                   "AllowanceUnreadable", "RoleRequired", "InvalidRoleParameter",
                   "AssumeRoleFailed", "ServiceUnavailable"})
# Decision::as_str (crates/admission/src/webhook.rs)
DECISIONS = frozenset({"patched", "skipped", "cleaned_up", "failed_open", "failed_closed"})

# metric -> {its dimension: the values it takes, None for any (STS's own error codes)}. A metric
# with several entries is recorded beside several counts: Metrics::record writes the request's
# latency beside every count, so BrokerLatency comes under each dimension of the broker's counts.
EMF = {
    "CredentialsServed": {"Outcome": {"served"}},
    "CredentialsDenied": {"Code": CODES},
    "BrokerLatency": {"Outcome": {"served"}, "Code": CODES,
                      "Table": {"Authorizations", "Allowances"}, "AwsCode": None},
    "Admissions": {"Decision": DECISIONS},
    "AdmissionLatency": {"Decision": DECISIONS},
    "CorruptTokenRecords": {"Table": {"Authorizations"}},
    "CorruptAllowanceRows": {"Table": {"Allowances"}},
    "StsErrors": {"AwsCode": None},
}


def emf_problems(metric, dimensions):
    """What is wrong with reading `iam-broker` metric `metric` under `dimensions` (a dict of
    name -> value, a value of None standing for "every value", as a SEARCH schema reads it):
    an empty list when the functions write it that way."""
    known = EMF.get(metric)
    if known is None:
        return [f"{metric} is not a metric the functions write (they write {sorted(EMF)})"]
    if len(dimensions) != 1:
        return [f"{metric} is read with dimensions {sorted(dimensions)}; the functions write it "
                f"with exactly one of {sorted(known)}"]
    (name, value), = dimensions.items()
    if name not in known:
        return [f"{metric} is read by dimension {name}; the functions write it by "
                f"{' or '.join(sorted(known))}"]
    values = known[name]
    if value is not None and values is not None and value not in values:
        return [f"{metric} is read with {name}={value}; the functions write {sorted(values)}"]
    return []


# ------------------------------------------------------------------ dashboard bodies
_SEARCH = re.compile(r"SEARCH\(\s*'([^']*)'")
_SCHEMA = re.compile(r"^\s*\{([^}]*)\}(.*)$", re.S)
_METRIC_NAME = re.compile(r'MetricName\s*=\s*(?:"([^"]*)"|([^\s")]+))')


def parse_search(expression):
    """The SEARCH calls of a metric math expression: (namespace, [dimension names], metric name)
    each; None for a part the query does not fix."""
    found = []
    for query in _SEARCH.findall(expression):
        schema = _SCHEMA.match(query)
        if schema:
            parts = [p.strip().strip('"') for p in schema.group(1).split(",")]
            namespace, dimensions, terms = parts[0], [p for p in parts[1:] if p], schema.group(2)
        else:
            namespace, dimensions, terms = None, None, query
        name = _METRIC_NAME.search(terms)
        found.append((namespace, dimensions, (name.group(1) or name.group(2)) if name else None))
    return found


def _rows(metrics):
    """A widget's `metrics` with the dashboard shorthand expanded: "." repeats the entry at the
    same position of the row before."""
    previous = []
    for row in metrics:
        options = row[-1] if row and isinstance(row[-1], dict) else None
        values = row[:-1] if options is not None else list(row)
        values = [previous[i] if v == "." and i < len(previous) else v
                  for i, v in enumerate(values)]
        if values:
            previous = values
        yield values, options or {}


def dashboard_references(body):
    """What a dashboard body (a dict) reads: (metrics, searches, alarm ARNs), with metrics as
    (namespace, metric, {dimension: value}, stat or None), searches as (namespace, [dimension
    names], metric, expression)."""
    metrics, searches, alarms = [], [], []
    for widget in body.get("widgets", []):
        properties = widget.get("properties", {})
        if widget.get("type") == "alarm":
            alarms.extend(properties.get("alarms", []))
            continue
        if widget.get("type") != "metric":
            continue
        for values, options in _rows(properties.get("metrics", [])):
            if options.get("expression"):
                for namespace, dimensions, name in parse_search(options["expression"]):
                    searches.append((namespace, dimensions, name, options["expression"]))
                continue
            if len(values) < 2 or len(values) % 2:
                raise ValueError(f"a dashboard metric row is not [namespace, metric, name, "
                                 f"value, ...]: {values}")
            namespace, metric, pairs = values[0], values[1], values[2:]
            dimensions = dict(zip(pairs[0::2], pairs[1::2]))
            metrics.append((namespace, metric, dimensions,
                            options.get("stat", properties.get("stat"))))
    return metrics, searches, alarms


def dashboard_problems(body):
    """Every `iam-broker` metric of a dashboard body (a dict) that the functions do not write
    as it is read; a SEARCH must fix the namespace, the dimension and the metric name."""
    metrics, searches, _ = dashboard_references(body)
    problems = []
    for namespace, metric, dimensions, _ in metrics:
        if namespace == NAMESPACE:
            problems += emf_problems(metric, dimensions)
    for namespace, dimensions, metric, expression in searches:
        if namespace is None or metric is None:
            problems.append(f"the SEARCH in {expression!r} names no namespace schema or no "
                            "MetricName: it may match anything")
        elif namespace == NAMESPACE:
            problems += emf_problems(metric, {d: None for d in dimensions})
    return problems


def dashboard_metric_names(body, namespace=NAMESPACE):
    """The metric names of `namespace` a dashboard body reads, explicitly or by SEARCH."""
    metrics, searches, _ = dashboard_references(body)
    return ({m for ns, m, _, _ in metrics if ns == namespace}
            | {m for ns, _, m, _ in searches if ns == namespace and m})


# ------------------------------------------------------------------ alarms
def alarm_references(alarm):
    """The metrics an alarm reads, (namespace, metric, {dimension: value}, statistic) each; the
    alarm as DescribeAlarms returns it or as the template's resolved properties (the same
    shape)."""
    def dims(items):
        return {d["Name"]: d["Value"] for d in items or []}

    if alarm.get("MetricName"):
        return [(alarm.get("Namespace"), alarm["MetricName"], dims(alarm.get("Dimensions")),
                 alarm.get("ExtendedStatistic") or alarm.get("Statistic"))]
    found = []
    for query in alarm.get("Metrics") or []:
        stat = query.get("MetricStat")
        if stat:
            metric = stat["Metric"]
            found.append((metric.get("Namespace"), metric["MetricName"],
                          dims(metric.get("Dimensions")), stat.get("Stat")))
    return found


# ------------------------------------------------------------------ what the functions wrote
def emf_record(line):
    """A log line as an EMF record (the parsed dict), or None for any other line."""
    line = line.strip()
    if not line.startswith("{") or '"_aws"' not in line:
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if isinstance(record, dict) and isinstance(record.get("_aws"), dict) \
            and "CloudWatchMetrics" in record["_aws"]:
        return record
    return None


def emitted(lines):
    """The metrics in a function's log lines: ({(metric, dimension, value): count}, problems),
    a problem being a record CloudWatch would not file as the template reads it (another
    namespace, not exactly one dimension, a value missing)."""
    seen, problems = {}, []
    for line in lines:
        record = emf_record(line)
        if record is None:
            continue
        for directive in record["_aws"]["CloudWatchMetrics"]:
            namespace = directive.get("Namespace")
            sets = directive.get("Dimensions") or []
            names = [m.get("Name") for m in directive.get("Metrics") or []]
            if namespace != NAMESPACE:
                problems.append(f"namespace {namespace!r}, not {NAMESPACE}: {line.strip()}")
                continue
            if len(sets) != 1 or len(sets[0]) != 1:
                problems.append(f"dimension sets {sets}, not exactly one of one dimension: "
                                f"{line.strip()}")
                continue
            dimension = sets[0][0]
            value = record.get(dimension)
            if not isinstance(value, str):
                problems.append(f"no value for dimension {dimension}: {line.strip()}")
                continue
            for name in names:
                if not isinstance(record.get(name), (int, float)):
                    problems.append(f"no value for metric {name}: {line.strip()}")
                    continue
                key = (name, dimension, value)
                seen[key] = seen.get(key, 0) + 1
    return seen, problems
