"""Nomad's ACL system: the policy language (``policy``), compiled ACL objects answering
"may this identity do X" (``acl``), and which policies a workload identity gets
(``jobacl``). Pure computation: no I/O, nothing above ``structs``/``jobspec``.
"""

from nomad_client.acl.acl import (
    ACL,
    DENY_ALL,
    MANAGEMENT,
    ACLCache,
    WorkloadClaim,
    compile_acl,
)
from nomad_client.acl.jobacl import JobACL, job_acl_matches, validate_job_acl
from nomad_client.acl.policy import (
    LabeledRule,
    NamespaceRule,
    Policy,
    PolicyError,
    VariablesPathRule,
    parse_policy,
    policy_to_rules_json,
)

__all__ = [
    "ACL",
    "DENY_ALL",
    "MANAGEMENT",
    "ACLCache",
    "JobACL",
    "LabeledRule",
    "NamespaceRule",
    "Policy",
    "PolicyError",
    "VariablesPathRule",
    "WorkloadClaim",
    "compile_acl",
    "job_acl_matches",
    "parse_policy",
    "policy_to_rules_json",
    "validate_job_acl",
]
