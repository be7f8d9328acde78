"""Pydantic models of cul8er: task payloads, plans, platform contract. No I/O here."""
