"""Placeholder: this rule is being written."""
