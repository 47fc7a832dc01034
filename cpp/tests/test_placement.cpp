// sysfs parsing and device-DAX discovery against a fake sysfs tree (PYKVSHM_SYSFS,
// PYKVSHM_DAX_DEV_DIR) with a regular file standing in for the device.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "pykvshm/dax.h"
#include "pykvshm/placement.h"
#include "test_support.h"

namespace pykvshm {
namespace {

namespace fs = std::filesystem;

TEST(PlacementParse, NodeLists) {
  EXPECT_EQ(placement::parse_list("0", "f"), (std::vector<int>{0}));
  EXPECT_EQ(placement::parse_list("0-2,5", "f"), (std::vector<int>{0, 1, 2, 5}));
  EXPECT_TRUE(placement::parse_list("", "f").empty());
  EXPECT_EQ(placement::format_list({0, 1, 3}), "0, 1, 3");
  EXPECT_EQ(placement::format_list({}), "none");
  EXPECT_CODE(placement::parse_list("0-x", "f"), ErrorCode::kPlacement);
  EXPECT_CODE(placement::parse_list("3-1", "f"), ErrorCode::kPlacement);
  EXPECT_CODE(placement::parse_list("0-99999", "f"), ErrorCode::kPlacement);
  EXPECT_CODE(placement::parse_list(",", "f"), ErrorCode::kPlacement);
  EXPECT_CODE(placement::parse_int("99999999999999999999", "f"), ErrorCode::kPlacement);
  EXPECT_EQ(placement::parse_int("-1", "f"), -1);
}

TEST(DaxNames, DeviceNames) {
  EXPECT_TRUE(dax::is_device_name("dax0.0"));
  EXPECT_TRUE(dax::is_device_name("dax12.345"));
  for (const char* bad : {"dax", "dax0", "dax0.", "dax.0", "daxa.0", "dax0.0x", "xdax0.0", "dax0.0.0", ""})
    EXPECT_FALSE(dax::is_device_name(bad)) << bad;
  EXPECT_TRUE(dax::is_device_path("/dev/dax0.0"));
  EXPECT_FALSE(dax::is_device_path("/tmp/dax0.0"));
  EXPECT_EQ(dax::format_uuid(std::array<uint8_t, 16>{0x0f, 0x8f, 0xad, 0x5b, 0xd9, 0xcb, 0x46, 0x9f, 0xa1, 0x65, 0x70,
                                                     0x86, 0x77, 0x28, 0x95, 0x0e}.data()),
            "0f8fad5b-d9cb-469f-a165-70867728950e");
}

class FakeDaxTree : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/pykvshm-dax-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    fs::create_directories(root_ / "sys/bus/dax/devices");
    fs::create_directories(root_ / "dev");
    setenv("PYKVSHM_SYSFS", (root_ / "sys").c_str(), 1);
    setenv("PYKVSHM_DAX_DEV_DIR", (root_ / "dev").c_str(), 1);
  }
  void TearDown() override {
    unsetenv("PYKVSHM_SYSFS");
    unsetenv("PYKVSHM_DAX_DEV_DIR");
    fs::remove_all(root_);
  }
  std::string add(const std::string& name, const std::string& size, uint64_t file_size) {
    fs::create_directories(root_ / "sys/bus/dax/devices" / name);
    std::ofstream(root_ / "sys/bus/dax/devices" / name / "size") << size << "\n";
    std::string path = (root_ / "dev" / name).string();
    std::ofstream(path).close();
    fs::resize_file(path, file_size);
    return path;
  }
  fs::path root_;
};

TEST_F(FakeDaxTree, AttributesOfAStandIn) {
  std::string p = add("dax0.0", std::to_string(8 << 20), 8 << 20);
  EXPECT_TRUE(dax::is_device_path(p));
  int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  dax::Attributes a = dax::attributes(fd, p);
  EXPECT_EQ(a.size, 8u << 20);
  EXPECT_EQ(a.align, 2u << 20);
  EXPECT_TRUE(a.stand_in);
  EXPECT_EQ(a.target_node, -1);
  ::close(fd);
}

TEST_F(FakeDaxTree, BadSysfsValuesAreErrors) {
  for (const char* size : {"", "12abc", "-4096", "4096"}) {
    std::string p = add("dax0.0", size, 8 << 20);
    int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    EXPECT_THROW(dax::attributes(fd, p), Error) << size;
    ::close(fd);
    fs::remove_all(root_ / "sys/bus/dax/devices/dax0.0");
    fs::remove(p);
  }
}

TEST_F(FakeDaxTree, ScanFindsPoolsAndSkipsOthers) {
  std::string foreign = add("dax0.0", std::to_string(4 << 20), 4 << 20);
  std::string pool_path = add("dax1.0", std::to_string(8 << 20), 8 << 20);
  PoolOptions opt;
  auto pool = Pool::create(pool_path, testing::kSmall, 0, opt);
  std::array<uint8_t, 16> uuid = pool->uuid();
  EXPECT_EQ(pool->mapping().backend(), Backend::kDevDax);
  EXPECT_EQ(pool->total_bytes(), 8u << 20);
  pool->close();
  auto probes = dax::scan();
  ASSERT_EQ(probes.size(), 2u);
  EXPECT_FALSE(probes[0].is_pool);
  EXPECT_EQ(probes[0].note, "not a pykvshm pool");
  EXPECT_TRUE(probes[1].is_pool);
  EXPECT_EQ(probes[1].uuid, uuid);
  EXPECT_EQ(dax::find_pool(uuid), pool_path);
  uuid[0] ^= 1;
  EXPECT_CODE(dax::find_pool(uuid), ErrorCode::kNotFound);
  Mapping::destroy(pool_path);
  EXPECT_CODE(Mapping::destroy(pool_path), ErrorCode::kNotFound);  // no pool on it any more: untouched
  EXPECT_CODE(Mapping::destroy(foreign), ErrorCode::kNotFound);
}

}  // namespace
}  // namespace pykvshm
