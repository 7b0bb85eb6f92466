"""Inference backends behind one Engine protocol; see engines/base.py."""
