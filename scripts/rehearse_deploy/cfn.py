"""template.yaml as CloudFormation sees it: SAM expansion and intrinsic-function resolution.

The rehearsal never copies a name, an action or an ARN out of template.yaml by hand: it expands
the template with the SAM translator (what `sam deploy` does server-side), then resolves `Ref`,
`Fn::GetAtt`, `Fn::Sub`, `Fn::If`, `Fn::Join`, ... against the parameters and the physical ids
the rehearsal gave each resource, exactly where CloudFormation would.
"""

import json
import os
import re
import tomllib

import yaml
from samtranslator.translator.transform import transform

ACCOUNT = "123456789012"
PARTITION = "aws"
URL_SUFFIX = "amazonaws.com"


class _CfnLoader(yaml.SafeLoader):
    """YAML loader that turns CloudFormation's short tags (!Ref, !Sub, ...) into their long form."""


def _short_tag(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _short_tag)


def load_template(path):
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_CfnLoader)


def samconfig_overrides(path, env="default"):
    """The `parameter_overrides` of samconfig.toml's deploy section, as a dict."""
    with open(path, "rb") as f:
        config = tomllib.load(f)
    text = config.get(env, {}).get("deploy", {}).get("parameters", {}).get("parameter_overrides", "")
    return dict(re.findall(r'(\w+)="([^"]*)"', text))


class _NoManagedPolicies:
    """The template names no managed policy by name (only statements), so nothing to look up."""

    def load(self):
        return {}


def expand(template, parameters, region, artifact_uri):
    """SAM → plain CloudFormation, as the service's transform does after `sam package` replaced
    each function's CodeUri with the uploaded artifact."""
    template = json.loads(json.dumps(template))
    for resource in template["Resources"].values():
        if resource["Type"] == "AWS::Serverless::Function":
            resource["Properties"]["CodeUri"] = artifact_uri
    values = dict(parameters)
    values.update({"AWS::Region": region, "AWS::AccountId": ACCOUNT, "AWS::Partition": PARTITION})
    os.environ.setdefault("AWS_DEFAULT_REGION", region)
    return transform(template, values, _NoManagedPolicies())


def parameter_refusals(template, parameters):
    """What CloudFormation refuses in `parameters` before the Rules: a name the template does not
    declare, or a value outside the parameter's AllowedValues, AllowedPattern, length or range."""
    declared = template.get("Parameters", {})
    refusals = [f"{name}: the template has no such parameter"
                for name in parameters if name not in declared]
    for name, spec in declared.items():
        value = str(parameters.get(name, spec.get("Default", "")))
        if spec.get("Type") == "CommaDelimitedList":
            continue
        if "AllowedValues" in spec and value not in [str(v) for v in spec["AllowedValues"]]:
            refusals.append(f"{name}: {value!r} is not one of {spec['AllowedValues']}")
        if "AllowedPattern" in spec and not re.fullmatch(spec["AllowedPattern"], value):
            refusals.append(f"{name}: {value!r} does not match {spec['AllowedPattern']}")
        if not spec.get("MinLength", 0) <= len(value) <= spec.get("MaxLength", len(value)):
            refusals.append(f"{name}: {len(value)} characters")
        if spec.get("Type") == "Number" and not (
                float(spec.get("MinValue", "-inf")) <= float(value) <= float(spec.get("MaxValue", "inf"))):
            refusals.append(f"{name}: {value} is out of range")
    return refusals


def rule_refusals(template, parameters):
    """The assertions of the template's Rules that `parameters` break, each as
    "<rule>: <AssertDescription>": CloudFormation refuses to create or update the stack with them,
    before it creates anything."""
    resolver = Resolver(template, parameters, "rules", "us-east-1")
    refusals = []
    for name, rule in template.get("Rules", {}).items():
        if "RuleCondition" in rule and not resolver.resolve(rule["RuleCondition"]):
            continue
        for assertion in rule.get("Assertions", []):
            if not resolver.resolve(assertion["Assert"]):
                refusals.append(f"{name}: {' '.join(assertion.get('AssertDescription', '').split())}")
    return refusals


class Unresolvable(Exception):
    pass


class Resolver:
    """Evaluates intrinsic functions of an expanded template.

    `physical` maps a logical id to what `Ref` returns; `attributes` maps (logical id, attribute)
    to what `Fn::GetAtt` returns. Both are filled in as the rehearsal creates resources.
    """

    def __init__(self, template, parameters, stack_name, region):
        self.template = template
        self.stack_name = stack_name
        self.region = region
        self.parameters = {}
        for name, spec in template.get("Parameters", {}).items():
            if name in parameters:
                value = str(parameters[name])
            elif "Default" in spec:
                value = spec["Default"]
            else:
                raise Unresolvable(f"parameter {name} has no value and no default")
            if spec.get("Type") == "CommaDelimitedList":
                value = [] if value == "" else [v.strip() for v in str(value).split(",")]
            else:
                value = str(value)
            self.parameters[name] = value
        self.physical = {}
        self.attributes = {}
        self._conditions = {}

    def pseudo(self, name):
        return {
            "AWS::Region": self.region,
            "AWS::AccountId": ACCOUNT,
            "AWS::Partition": PARTITION,
            "AWS::StackName": self.stack_name,
            "AWS::URLSuffix": URL_SUFFIX,
            "AWS::StackId": f"arn:aws:cloudformation:{self.region}:{ACCOUNT}:stack/{self.stack_name}/rehearsal",
        }.get(name)

    def ref(self, name):
        if name == "AWS::NoValue":
            return _NO_VALUE
        value = self.pseudo(name)
        if value is not None:
            return value
        if name in self.parameters:
            return self.parameters[name]
        if name in self.physical:
            return self.physical[name]
        raise Unresolvable(f"Ref {name}: not created yet")

    def condition(self, name):
        if name not in self._conditions:
            self._conditions[name] = bool(self.resolve(self.template["Conditions"][name]))
        return self._conditions[name]

    def active(self, logical_id):
        condition = self.template["Resources"][logical_id].get("Condition")
        return condition is None or self.condition(condition)

    def resolve(self, value):
        if isinstance(value, list):
            out = [self.resolve(v) for v in value]
            return [v for v in out if v is not _NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (key, arg), = value.items()
            if key == "Ref":
                return self.ref(arg)
            if key == "Condition":
                return self.condition(arg)
            if key.startswith("Fn::"):
                return getattr(self, "_fn_" + key[4:].lower())(arg)
        out = {k: self.resolve(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _NO_VALUE}

    def _fn_getatt(self, arg):
        logical, attribute = arg if isinstance(arg, list) else arg.split(".", 1)
        try:
            return self.attributes[(logical, attribute)]
        except KeyError:
            raise Unresolvable(f"Fn::GetAtt {logical}.{attribute}: not created yet") from None

    def _fn_sub(self, arg):
        text, variables = (arg, {}) if isinstance(arg, str) else (arg[0], arg[1])
        variables = {k: self.resolve(v) for k, v in variables.items()}

        def one(match):
            name = match.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if name in variables:
                return str(variables[name])
            if "." in name and not name.startswith("AWS::"):
                return str(self._fn_getatt(name.split(".", 1)))
            return str(self.ref(name))

        return re.sub(r"\$\{([^}]+)\}", one, text)

    def _fn_if(self, arg):
        name, then, otherwise = arg
        return self.resolve(then if self.condition(name) else otherwise)

    def _fn_equals(self, arg):
        left, right = (self.resolve(a) for a in arg)
        return left == right

    def _fn_not(self, arg):
        return not self.resolve(arg[0])

    def _fn_and(self, arg):
        return all(self.resolve(a) for a in arg)

    def _fn_or(self, arg):
        return any(self.resolve(a) for a in arg)

    def _fn_join(self, arg):
        separator, items = arg
        items = self.resolve(items)
        return separator.join(str(i) for i in items)

    def _fn_select(self, arg):
        index, items = arg
        return self.resolve(items)[int(self.resolve(index))]

    def _fn_split(self, arg):
        separator, text = arg
        return self.resolve(text).split(separator)


class _NoValueType:
    def __repr__(self):
        return "AWS::NoValue"


_NO_VALUE = _NoValueType()
