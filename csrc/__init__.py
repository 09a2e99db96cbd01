"""The C++/CUDA sources of the extension ``resconv._C``, installed as package data
(``resconv.csrc``) so that an installed wheel can compile them just in time; see
:mod:`resconv.build`. Nothing to import here."""
