"""yolocomp.eval"""
