"""The intelligent-monitoring rule base: declarative rules, knowledge tables, stateful detectors."""

from .detectors import KINDS, check_rule
from .knowledge import Knowledge, KnowledgeError, load_knowledge
from .model import Rule, RuleError
from .rulebook import RULES_FILE, RuleBook, RuleSet, load_rules_file

__all__ = [
    "KINDS",
    "RULES_FILE",
    "Knowledge",
    "KnowledgeError",
    "Rule",
    "RuleBook",
    "RuleError",
    "RuleSet",
    "check_rule",
    "load_knowledge",
    "load_rules_file",
]
