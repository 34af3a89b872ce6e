"""Pure billing rules, records and the mapping language: no I/O, no clock."""
