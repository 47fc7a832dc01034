// Bindings of device-DAX discovery (dax.h): scan the devices, find a pool by uuid.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>

#include "bindings.h"
#include "pykvshm/dax.h"

namespace py = pybind11;

namespace pykvshm::bindings {

void register_dax(py::module_& m) {
  m.def("dax_scan", [] {
    std::vector<dax::Probe> probes;
    {
      py::gil_scoped_release rel;
      probes = dax::scan();
    }
    py::list out;
    for (const auto& p : probes) {
      py::dict d;
      d["name"] = p.name;
      d["path"] = p.path;
      d["size"] = p.size;
      d["uuid"] = p.is_pool ? py::object(py::bytes(reinterpret_cast<const char*>(p.uuid.data()), 16)) : py::object(py::none());
      d["note"] = p.note;
      out.append(d);
    }
    return out;
  });
  m.def("dax_find_pool", [](py::bytes uuid) {
    std::string s = uuid;
    if (s.size() != 16) throw py::value_error("a pool uuid is 16 bytes");
    std::array<uint8_t, 16> u{};
    std::memcpy(u.data(), s.data(), 16);
    py::gil_scoped_release rel;
    return dax::find_pool(u);
  }, py::arg("uuid"));
}

}  // namespace pykvshm::bindings
