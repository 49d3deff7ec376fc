"""yolocomp.prune"""
