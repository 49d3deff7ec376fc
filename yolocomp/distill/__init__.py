"""yolocomp.distill"""
