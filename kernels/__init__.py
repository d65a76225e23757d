"""Triton kernels, installed as kangaroo_rt.kernels; see kangaroo_rt.ops"""
