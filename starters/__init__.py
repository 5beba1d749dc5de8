"""Starters: the `remediate` command line for commanders, approvers and operators."""
