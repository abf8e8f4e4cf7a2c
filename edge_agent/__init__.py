"""edge-agent: turns PLC signals into exact, lot-bound backflush postings for the MES."""

__version__ = "0.1.0"
