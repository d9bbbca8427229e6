"""Tucker decompositions: HOSVD, ST-HOSVD, HOOI and randomized ST-HOSVD.

Every function takes a tensor of any array API library and returns a
:class:`~tuckerlib.TuckerTensor` with orthonormal, sign-fixed factors in the
input's library, device and dtype.
"""

from tuckerlib.decompositions._hooi import HOOIInfo, hooi
from tuckerlib.decompositions._hosvd import hosvd
from tuckerlib.decompositions._rhosvd import rhosvd
from tuckerlib.decompositions._sthosvd import sthosvd

__all__ = ["HOOIInfo", "hooi", "hosvd", "rhosvd", "sthosvd"]
