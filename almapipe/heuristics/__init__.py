"""Heuristics and shared helpers of the stages, as pure functions.

Nothing here reads or writes objects or imports a stage module: a stage module
imports from here (and from almapipe.calibration / imaging / msio), never from
another stage module's internals, so the stage modules form no import cycles
(tests/test_stage_unit.py walks the imports).
"""
