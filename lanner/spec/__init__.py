"""Speculative decoding: proposers (n-gram prompt lookup, a draft model) that guess the
next tokens, and the rejection sampler that verifies them in one target forward."""
