#pragma once

#include <pybind11/pybind11.h>

namespace pykvshm::bindings {

void register_errors(pybind11::module_& m);
void register_pool(pybind11::module_& m);
void register_dax(pybind11::module_& m);

}  // namespace pykvshm::bindings
