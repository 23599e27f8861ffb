"""Shared data models and their wire codecs."""
