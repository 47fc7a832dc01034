# C++ micro-benchmarks (bench/cpp).  Off by default; they are run by hand, not by ctest:
#   cmake -S . -B build/bench -G Ninja -DCMAKE_BUILD_TYPE=Release -DPYKVSHM_BUILD_PYTHON=OFF -DPYKVSHM_BUILD_BENCH=ON
#   ninja -C build/bench pykvshm_alloc_bench && build/bench/pykvshm_alloc_bench
# Included from the root CMakeLists.txt after the pykvshm_core target is defined.
option(PYKVSHM_BUILD_BENCH "Build the C++ micro-benchmarks in bench/cpp" OFF)

if(PYKVSHM_BUILD_BENCH)
  if(NOT TARGET pykvshm_core)
    message(FATAL_ERROR "cmake/bench.cmake must be included after the pykvshm_core target is defined")
  endif()
  add_executable(pykvshm_alloc_bench ${PROJECT_SOURCE_DIR}/bench/cpp/alloc_bench.cpp)
  target_link_libraries(pykvshm_alloc_bench PRIVATE pykvshm_core)
  target_compile_options(pykvshm_alloc_bench PRIVATE ${PYKVSHM_WARNINGS})
endif()
