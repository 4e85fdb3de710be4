"""The restricted pickle machinery: scan the opcodes, unpickle into inert records, judge names, write pickles.

Reading never calls anything named by a file (:mod:`.unpickler`, :mod:`.builders`); writing emits only what
:mod:`.policy` allows (:mod:`.writer`); :mod:`.structure` is the same records as JSON, for formats without pickles.
"""
